"""The orchestrator: grid, identity, skip FINISHED, FAILED recorded without stopping, MLflow layout."""

from __future__ import annotations

import contextlib
import json
import sys
import time

import pytest

from prunebench.cli import main
from suite.run.config import load_experiment
from suite.run.grid import expand
from suite.run.runner import Runner
from suite.run.tracking import Tracker
from suite.testing import tiny_experiment, tiny_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("m") / "tiny")


def _config(tmp_path, model_dir, **extra):
    return tiny_experiment(tmp_path, model_dir, **extra)


def _runs(workdir, name="unit"):
    t = Tracker(workdir, name)
    return t.client.search_runs([t.experiment_id], max_results=1000)


def test_run_records_each_grid_point_once_and_resumes(tmp_path, model_dir, capsys):
    cfg = _config(tmp_path, model_dir)
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    runs = _runs(workdir)
    kinds = sorted(r.data.tags.get("prunebench.kind", r.data.tags.get("prunebench.role")) for r in runs)
    assert kinds == ["dense", "parent", "pruned", "pruned"]
    pruned = [r for r in runs if r.data.tags.get("prunebench.kind") == "pruned"]
    parent = next(r for r in runs if r.data.tags.get("prunebench.role") == "parent")
    assert parent.info.status == "FINISHED"  # the sweep ended; a resume reopens it
    for r in pruned:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"sparsity", "mean_acc", "dense.mean_acc", "retained.mean_acc"} <= set(r.data.metrics)
        assert r.data.tags["prunebench.protocol"] and r.data.tags["prunebench.git_commit"]
        assert abs(r.data.metrics["sparsity"] - 0.3) < 0.05
    ddp = next(r for r in pruned if r.data.params["method"] == "ddp")
    assert "curve.lm_loss" in ddp.data.metrics
    client = Tracker(workdir, "unit").client
    arts = {a.path for a in client.list_artifacts(ddp.info.run_id)}
    assert {"masks.safetensors", "masks.json", "metrics.json", "heatmap.png", "curves.json"} <= arts
    # identical calibration for every method on the same model
    assert len({r.data.params["calibration.hash"] for r in pruned}) == 1
    assert "random" in capsys.readouterr().out
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0  # nothing new
    assert len(_runs(workdir)) == len(runs)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, model_dir):
    # skipping every layer makes every target unreachable: both runs fail, each recorded FAILED with its error
    cfg = _config(tmp_path, model_dir, target={"skip_layers": [0, 1, 2]})
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 1
    pruned = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]
    assert len(pruned) == 2 and all(r.info.status == "FAILED" for r in pruned)
    assert all("unreachable" in r.data.tags["prunebench.error"] for r in pruned)
    parent = next(r for r in _runs(workdir) if r.data.tags.get("prunebench.role") == "parent")
    assert parent.info.status == "FAILED"
    with pytest.raises(Exception, match="unreachable"):
        Runner(load_experiment(cfg), tmp_path / "runs2", fail_fast=True, progress=False).run()


def test_identity_changes_with_what_determines_the_result(tmp_path, model_dir):
    base = load_experiment(_config(tmp_path, model_dir))
    ids = {s.identity("fp") for s in expand(base, tmp_path)}
    assert len(ids) == 2
    other = load_experiment(_config(tmp_path, model_dir), ["methods.1.params.steps=5"])
    assert {s.identity("fp") for s in expand(other, tmp_path)} & ids == {next(
        s.identity("fp") for s in expand(base, tmp_path) if s.method == "random")}
    assert {s.identity("fp2") for s in expand(base, tmp_path)}.isdisjoint(ids)


def _with_sources(monkeypatch, edit, measure):
    """`measure()` with every source file read through `edit(path, text)`, the fingerprints' caches cleared around
    it, so the result is what edited code would fingerprint."""
    import suite.run.grid as grid

    read = grid._read
    caches = (grid.code_fingerprint, grid.source_digest)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(grid, "_read", lambda path: edit(path, read(path)))
    try:
        return measure()
    finally:
        monkeypatch.setattr(grid, "_read", read)
        for cache in caches:
            cache.cache_clear()


def test_a_docstring_edit_keeps_every_identity_and_a_method_edit_renews_only_its_own(monkeypatch):
    """Issue 32 (6): the code fingerprint is the syntax a run executes, docstrings left out. A reworded docstring
    (or comment) anywhere in suite/ or in a method keeps every identity; a changed line of suite/ renews them all;
    a changed scoring line of one method renews that method's and no other method's."""
    import suite.run.grid as grid
    from suite.methods.pruner import methods

    names = sorted(methods())
    before = {m: grid.method_fingerprint(m) for m in names}

    def reworded(path, text):  # every module docstring and every comment line, reworded
        lines = [line + " (reworded)" if line.lstrip().startswith("#") else line for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
        return text.replace('"""', '"""Reworded. ', 1) if text.startswith('"""') else text

    assert sum(reworded(p, grid._read(p)) != grid._read(p) for m in names for p in grid.method_modules(m)) > 5
    assert _with_sources(monkeypatch, reworded, lambda: {m: grid.method_fingerprint(m) for m in names}) == before

    def score_line(path, text):  # wanda_sp's score: the mean |W| times the input norm, squared instead
        if path.name != "wanda_sp.py":
            return text
        assert "abs().mean(0)" in text
        return text.replace("abs().mean(0)", "abs().mean(0) ** 2", 1)

    after = _with_sources(monkeypatch, score_line, lambda: {m: grid.method_fingerprint(m) for m in names})
    assert {m for m in names if after[m] != before[m]} == {"wanda_sp"}
    suite_edit = _with_sources(monkeypatch, lambda path, text: text + "\nEDITED = 1\n" if path.name == "select.py"
                               or path.name == "masks.py" else text, lambda: grid.method_fingerprint("random"))
    assert suite_edit != before["random"]


def test_identity_changes_with_the_code_and_the_data(tmp_path, model_dir, monkeypatch):
    """A source edit (the code fingerprint), other calibration text or other evaluation text: new identities, so a
    resumed sweep never reuses a result made by older code or from other data. The evaluation text leaves the
    pruning identity (masks are reused) alone; calibration text changes both."""
    from dataclasses import replace


    exp = load_experiment(_config(tmp_path, model_dir))
    spec = expand(exp, tmp_path)[0]
    assert spec.code.startswith("0.1.0+") and spec.calibration_data and spec.evaluation_data["ppl"]
    edited = _with_sources(monkeypatch, lambda path, text: text + "\nEDITED = 1\n" if path.name == "masks.py" else text,
                           lambda: expand(exp, tmp_path)[0])
    assert edited.code != spec.code and edited.identity("fp") != spec.identity("fp")
    assert expand(exp, tmp_path)[0].identity("fp") == spec.identity("fp")  # the same code: the same identity
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(60):
        (text / f"doc{i}.txt").write_text(f"document {i} " * 200)
    calibration = expand(load_experiment(_config(tmp_path, model_dir), [f"calibration.source={text}"]), tmp_path)[0]
    assert calibration.calibration_data != spec.calibration_data
    evaluation = replace(spec, evaluation_data=spec.evaluation_data | {"ppl": {"embedded:test@128/32": "other"}})
    assert evaluation.identity("fp") != spec.identity("fp")
    assert evaluation.pruning_identity("fp") == spec.pruning_identity("fp")


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "bogus: unknown key"),
    ("methods.0.name=nosuch", "unknown method 'nosuch'"),
    ("sparsities=[0.5, 1.5]", "sparsities: sparsity 1.5 is outside (0, 1)"),
    ("methods.1.params.bogus=2", "methods.1.params.bogus: unknown key"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(tmp_path, model_dir, capsys, override, message):
    assert main(["validate", str(_config(tmp_path, model_dir)), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodels: [a\n")
    assert main(["validate", str(path)]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["hard_concrete", "maskprune"])
def test_every_mask_learner_tunes_with_its_own_default_space_and_feeds_run(tmp_path, model_dir, method, capsys):
    """`tuned: true` works for every mask learner without a user-written search space: each declares one, with the
    engine's knobs (travel, target_warmup) in the same ranges as DDP's, and gets `tuning.n_trials` trials, which
    `tune` reports. Trial runs and grid runs carry the same MLflow params."""
    import json

    from suite.methods import get_method

    methods = [{"name": "random"}, {"name": method, "params": {"steps": 4, "batch_size": 2, "valid_batches": 1}}]
    overrides = ["tuning.n_trials=2", "tuning.report_every=2", f"tuning.methods=[{method}]"]
    cfg = _config(tmp_path, model_dir, methods=methods)
    workdir = tmp_path / "runs"
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["tune", str(cfg), "--workdir", str(workdir), *sets]) == 0
    out, err = capsys.readouterr()
    assert f"  {method} on {model_dir}: 2 distinct configurations pruned; 2 trials this run; study total 2" in out
    best = json.loads(next((workdir / "tuned").rglob("*.json")).read_text())
    # four steps never reach a 0.3 target: the best trial is a projection result, and tune says so
    assert best["missed_budget"] and abs(best["relaxed_sparsity"] - 0.3) > 0.02
    assert f"warning: the best trial of {method} missed its budget" in err
    assert set(best["best_params"]) == set(get_method(method).search_space) >= {"travel", "target_warmup"}
    assert best["n_trials"] == best["ran"] == 2
    tuned = next(s for s in expand(load_experiment(cfg, ["methods.1.tuned=true", *overrides]), workdir)
                 if s.method == method)
    assert all(tuned.hyperparameters[k] == v for k, v in best["best_params"].items())
    assert main(["run", str(cfg), "--workdir", str(workdir), "--set", "methods.1.tuned=true", *sets]) == 0
    runs = _runs(workdir)
    trial = next(r for r in runs if r.data.tags.get("prunebench.kind") == "trial")
    pruned = next(r for r in runs
                  if r.data.tags.get("prunebench.kind") == "pruned" and r.data.params["method"] == method)
    assert set(trial.data.params) - {"trial"} == set(pruned.data.params) - {"calibration.hash"}
    assert any(k.startswith("hp.") for k in trial.data.params)


def test_tune_resumes_one_study_and_feeds_run(tmp_path, model_dir):

    import optuna

    from suite.run.tuning import storage_uri

    overrides = ["tuning.n_trials=3", "tuning.report_every=2", "methods.1.params.steps=6"]
    cfg = _config(tmp_path, model_dir)
    workdir = tmp_path / "runs"
    assert main(["tune", str(cfg), "--workdir", str(workdir), *(x for o in overrides for x in ("--set", o))]) == 0
    assert main(["tune", str(cfg), "--workdir", str(workdir), *(x for o in overrides for x in ("--set", o))]) == 0
    (study,) = optuna.get_all_study_summaries(storage_uri(workdir))
    assert study.n_trials == 6  # the second invocation resumed the same study
    best = json.loads(next((workdir / "tuned").rglob("*.json")).read_text())
    assert set(best["best_params"]) == {"schedule", "mu_start", "mu_end", "target_warmup", "travel"}
    trials = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "trial"]
    assert len(trials) == 6
    tuned = load_experiment(cfg, ["methods.1.tuned=true", *overrides])
    spec = next(s for s in expand(tuned, workdir) if s.method == "ddp")
    assert spec.hyperparameters["mu_end"] == best["best_params"]["mu_end"]
    untuned = next(s for s in expand(load_experiment(cfg, overrides), workdir) if s.method == "ddp")
    assert spec.identity("fp") != untuned.identity("fp")
    # optuna-dashboard opens the storage and lists the study
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/api/studies"
    statuses = []
    body = b"".join(wsgi(storage_uri(workdir))(environ, lambda status, headers, *exc: statuses.append(status)))
    assert statuses[0].startswith("200")
    assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == [study.study_name]


def _warm_for_forks():
    """Imports and the corpus, loaded once in the parent instead of in every forked child."""
    import mlflow.tracking  # noqa: F401

    from suite.data.sources import embedded_corpus
    from suite.data.tasks import task_dir

    embedded_corpus().documents("train")
    task_dir("test")


def _sweep_child(cfg, workdir):
    """A forked `prunebench run` (no interpreter start-up: ten of them cost what one subprocess does). One thread:
    the parent's OpenMP pool does not survive a fork."""
    import torch

    torch.set_num_threads(1)
    sys.exit(main(["run", str(cfg), "--workdir", str(workdir)]))


def _store_state(workdir):
    """(status, kind, identity, run id) of every run, read with sqlite3 so the parent never holds MLflow's cached
    store (and its connections) across a fork."""
    import sqlite3

    if not (workdir / "mlflow.db").exists():
        return []
    with contextlib.closing(sqlite3.connect(workdir / "mlflow.db", timeout=30)) as db:
        if not db.execute("SELECT name FROM sqlite_master WHERE name = 'runs'").fetchall():
            return []  # killed before the schema was made
        return db.execute("""SELECT r.status, k.value, i.value, r.run_uuid FROM runs r
                             JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'prunebench.kind'
                             JOIN tags i ON i.run_uuid = r.run_uuid AND i.key = 'prunebench.identity'""").fetchall()


def _check_no_duplicate_or_hollow_finished_run(workdir):
    finished = [(kind, identity, run) for status, kind, identity, run in _store_state(workdir) if status == "FINISHED"]
    identities = [identity for _, identity, _ in finished]
    assert len(identities) == len(set(identities)), "a grid point FINISHED twice"
    for kind, _, run in finished:
        artifacts = {p.name for p in (workdir / "mlartifacts" / "unit" / run / "artifacts").rglob("*")}
        wanted = {"evaluation.json"} if kind == "dense" else {"masks.safetensors", "metrics.json", "heatmap.png"}
        assert wanted <= artifacts, f"{kind} run {run} FINISHED without {wanted - artifacts}"
    return finished


def _faulty_child(cfg, workdir, window):
    """A forked `prunebench run` that SIGKILLs itself at a named window of its work (the first time it gets there)."""
    import os
    import shutil
    import signal
    import threading

    import mlflow.store.db.utils as db_utils

    from suite.run import tracking
    from suite.run.claims import FileClaims

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kind(tracker, run_id):
        return tracker.client.get_run(run_id).data.tags

    if window == "store creation":  # a timer fires inside MLflow's migrations (about a second here)
        upgrade = db_utils._upgrade_db

        def dying_upgrade(engine):
            threading.Timer(0.3, die).start()
            upgrade(engine)

        db_utils._upgrade_db = dying_upgrade
    elif window == "claimed, before the MLflow run starts":
        start = Tracker.start
        Tracker.start = lambda self, name, identity, tags: (die() if tags.get("prunebench.kind") == "pruned" else
                                                             start(self, name, identity, tags))
    elif window == "mid-artifacts":  # the second file of a run's artifacts (a dense run has only one)
        copytree, copied = shutil.copytree, []

        def copy(src, dst):
            copied.append(src)
            if len(copied) == 2:
                die()
            return shutil.copy2(src, dst)

        tracking.shutil = type("Shutil", (), {"copytree": staticmethod(
            lambda src, dst, **kw: copytree(src, dst, copy_function=copy, **kw))})
    elif window in ("between artifacts and FINISHED", "a nested row, before FINISHED"):
        finish = Tracker.finish
        tag = "prunebench.kind" if window.startswith("between") else "prunebench.nested_in"

        def dying_finish(self, run_id, status="FINISHED"):
            tags = kind(self, run_id)
            if status == "FINISHED" and tag in tags and tags.get("prunebench.kind") == "pruned":
                die()
            finish(self, run_id, status)

        Tracker.finish = dying_finish
    elif window == "after FINISHED, before the claim is released":
        FileClaims.release = lambda self, identity: die()
    _sweep_child(cfg, workdir)


KILL_WINDOWS = ["store creation", "claimed, before the MLflow run starts", "mid-artifacts",
                "between artifacts and FINISHED", "a nested row, before FINISHED",
                "after FINISHED, before the claim is released"]


@pytest.mark.slow
@pytest.mark.parametrize("window", KILL_WINDOWS)
def test_a_worker_killed_at_a_named_window_never_duplicates_loses_or_fakes_a_run(tmp_path, model_dir, window):
    """Two workers on a fresh workdir, one SIGKILLed at a named window of its work (GISP's nested rows included):
    the other takes the dead worker's point over and ends with exit 0; every grid point and nested row is FINISHED
    exactly once with its artifacts, nothing stays RUNNING, the store opens, and a resume adds no run. Every wait
    has a deadline: a hang fails the test instead of stalling it."""
    import multiprocessing
    import os
    import signal

    cfg = _config(tmp_path, model_dir, methods=[{"name": "gisp", "params": {"iterations": 3, "nested": [0.2]}},
                                                {"name": "random"}],
                  sparsities=[0.4], seeds=[0, 1],
                  evaluation={"ppl": ["embedded:test@64/4"], "tasks": ["pb_next_line"], "limit": 4})
    workdir = tmp_path / "runs"
    ctx = multiprocessing.get_context("fork")
    _warm_for_forks()
    faulty = ctx.Process(target=_faulty_child, args=(cfg, workdir, window))
    healthy = ctx.Process(target=_sweep_child, args=(cfg, workdir))
    faulty.start()
    deadline = time.time() + 120
    # the healthy worker starts once the faulty one is building the store (it then waits on the workdir lock and
    # finds what the kill left), or else once it has started a run (the faulty one takes the first points)
    while not (any(workdir.glob(".mlflow.db.*.tmp")) if window == "store creation" else _store_state(workdir)):
        assert faulty.is_alive() and time.time() < deadline, "the faulty worker never got there"
        time.sleep(0.01)
    healthy.start()
    for worker in (faulty, healthy):
        worker.join(600)
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
            pytest.fail(f"a worker hung ({window})")
    assert faulty.exitcode == -signal.SIGKILL, f"the kill window {window!r} was never reached"
    assert healthy.exitcode == 0
    finished = _check_no_duplicate_or_hollow_finished_run(workdir)
    assert sorted(kind for kind, _, _ in finished) == ["dense"] + ["pruned"] * 6  # 4 points + 2 nested rows
    assert not [s for s in _store_state(workdir) if s[0] == "RUNNING"]
    runs = len(_store_state(workdir))
    resume = ctx.Process(target=_sweep_child, args=(cfg, workdir))
    resume.start()
    resume.join(600)
    assert resume.exitcode == 0 and len(_store_state(workdir)) == runs


def test_nested_masks_become_their_own_rows_once(tmp_path, model_dir):
    """GISP's "prune once, deploy many": the lower sparsities met on the way are evaluated as their own runs."""
    cfg = _config(tmp_path, model_dir, methods=[{"name": "gisp", "params": {"iterations": 4, "nested": [0.2]}}],
                  sparsities=[0.4], seeds=[0])
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    pruned = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]
    assert sorted(float(r.data.params["sparsity"]) for r in pruned) == [0.2, 0.4]
    assert all(r.info.status == "FINISHED" for r in pruned)
    nested = next(r for r in pruned if r.data.params["sparsity"] == "0.2")
    parent = next(r for r in pruned if r.data.params["sparsity"] == "0.4")
    assert nested.data.tags["prunebench.nested_in"] == parent.data.tags["prunebench.pruning_identity"]
    assert abs(nested.data.metrics["sparsity"] - 0.2) < 0.05 and nested.data.metrics["sparsity"] < 0.4
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0  # resumed: nothing new
    assert len([r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]) == 2


def test_two_workers_split_a_sweep_and_never_run_a_grid_point_twice(tmp_path, model_dir):
    """Two `prunebench run` processes started together on one workdir: 12 grid points, each executed once, by
    one of them; both end with the whole table and exit 0."""
    import multiprocessing

    cfg = _config(tmp_path, model_dir, methods=[{"name": "random"}, {"name": "magnitude"}],
                  sparsities=[0.2, 0.3, 0.4], seeds=[0, 1])
    workdir = tmp_path / "runs"
    _warm_for_forks()
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_sweep_child, args=(cfg, workdir)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    assert [w.exitcode for w in workers] == [0, 0]
    runs = _runs(workdir)
    pruned = [r for r in runs if r.data.tags.get("prunebench.kind") == "pruned"]
    identities = [r.data.tags["prunebench.identity"] for r in pruned]
    assert len(pruned) == 12 and len(set(identities)) == 12
    assert all(r.info.status == "FINISHED" for r in pruned)
    assert len([r for r in runs if r.data.tags.get("prunebench.kind") == "dense"]) == 1
    assert len([r for r in runs if r.data.tags.get("prunebench.role") == "parent"]) == 1
    assert {r.data.tags["prunebench.worker"].rsplit(":", 1)[1] for r in pruned} == {str(w.pid) for w in workers}


def test_claims_exclude_live_holders_and_take_over_dead_ones(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from suite.run.claims import FileClaims

    with FileClaims(tmp_path, lease=60) as mine:
        assert mine.acquire("a") and (tmp_path / "claims" / "a.claim").exists()
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (tmp_path / "claims" / "b.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
            assert not mine.acquire("b") and mine.holder("b")["pid"] == other.pid  # alive: excluded
        finally:
            other.kill()
            other.wait()
        assert mine.acquire("b")  # its holder died: taken over
        (tmp_path / "claims" / "c.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        assert not mine.acquire("c")  # another host, fresh: excluded until its lease runs out
        old = (tmp_path / "claims" / "c.claim").stat().st_mtime - 61
        os.utime(tmp_path / "claims" / "c.claim", (old, old))
        assert mine.acquire("c")
    assert not list((tmp_path / "claims").glob("*.claim"))  # all released


@pytest.mark.slow
def test_the_ray_executor_gives_the_local_results_table(tmp_path, model_dir):
    """The same sweep, in this process and as one Ray task per grid point on a local Ray cluster bound to
    127.0.0.1: the same results table (prune seconds aside), every run recorded by a Ray worker process."""
    pytest.importorskip("ray")
    import os

    from suite.run.record import results_table

    def table(executor):
        cfg = load_experiment(_config(tmp_path / executor["kind"], model_dir, executor=executor,
                                      methods=[{"name": "random"}, {"name": "magnitude"}], sparsities=[0.4]))
        rows = Runner(cfg, tmp_path / executor["kind"] / "runs", progress=False).run()
        return [{k: v for k, v in r.items() if k != "prune_s"} for r in rows], tmp_path / executor["kind"] / "runs"

    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local, _ = table({"kind": "local"})
    on_ray, workdir = table({"kind": "ray", "num_cpus": 1})
    assert results_table(on_ray) == results_table(local) and len(on_ray) == 2
    assert all(r["status"] == "FINISHED" for r in on_ray)
    workers = {r.data.tags["prunebench.worker"] for r in _runs(workdir) if r.data.tags.get("prunebench.kind") ==
               "pruned"}
    assert workers and f":{os.getpid()}" not in "".join(workers)


def test_a_new_evaluation_protocol_reuses_every_pruning(tmp_path, model_dir, monkeypatch):
    """Changing only `evaluation.limit` prunes nothing: each new row takes the masks (and, for a method that rewrote
    weights, the stored compact checkpoint) of the FINISHED run with its pruning identity, and measures the same
    perplexity; nested (GISP) rows come along. The report can then pick one protocol."""
    import suite.run.runner

    methods = [{"name": "random"}, {"name": "flap"},
               {"name": "gisp", "params": {"iterations": 3, "nested": [0.2]}}]
    cfg = _config(tmp_path, model_dir, methods=methods, sparsities=[0.4])
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    first = {(r.data.params["label"], r.data.params["sparsity"]): r for r in _runs(workdir)
             if r.data.tags.get("prunebench.kind") == "pruned"}
    assert len(first) == 4 and first["flap", "0.4"].data.metrics["params_added"] > 0

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned again")

    monkeypatch.setattr(suite.run.runner, "prune_model", no_pruning)
    cfg = _config(tmp_path, model_dir, methods=methods, sparsities=[0.4],
                  evaluation={"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 8})
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    runs = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]
    assert len(runs) == 8
    for r in runs:
        if r.info.run_id in {f.info.run_id for f in first.values()}:
            continue
        before = first[r.data.params["label"], r.data.params["sparsity"]]
        assert r.data.tags["prunebench.pruning_identity"] == before.data.tags["prunebench.pruning_identity"]
        assert r.data.tags["prunebench.protocol"] != before.data.tags["prunebench.protocol"]
        ppl = "ppl.embedded_test_128/32"
        assert r.data.metrics[ppl] == pytest.approx(before.data.metrics[ppl], rel=1e-6), r.data.params["label"]
        assert r.data.metrics["prune_seconds"] == before.data.metrics["prune_seconds"]
    assert main(["report", "--experiment", "unit", "--workdir", str(workdir), "--out", str(tmp_path / "r")]) == 2
    assert main(["report", "--experiment", "unit", "--workdir", str(workdir), "--out", str(tmp_path / "r"),
                 "--latest"]) == 0
    results = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 1 + 4  # header, dense, the four pruned rows of the latest protocol
    old = first["random", "0.4"].data.tags["prunebench.protocol"]
    assert main(["report", "--experiment", "unit", "--workdir", str(workdir), "--out", str(tmp_path / "r"),
                 "--protocol", old[:8]]) == 0
    assert old in (tmp_path / "r" / "results.csv").read_text()


def test_without_stored_models_a_weight_rewriting_method_prunes_again(tmp_path, model_dir, monkeypatch):
    """`tracking.store_models: false`: masks replay `random` on a new protocol, but FLAP (its biases live in the
    weights) is pruned again rather than replayed wrong."""
    import suite.run.runner

    methods = [{"name": "random"}, {"name": "flap"}]
    cfg = _config(tmp_path, model_dir, methods=methods, tracking={"store_models": False})
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    pruned = []
    real = suite.run.runner.prune_model
    monkeypatch.setattr(suite.run.runner, "prune_model", lambda model, pruner, *a, **k: pruned.append(pruner.name)
                        or real(model, pruner, *a, **k))
    cfg = _config(tmp_path, model_dir, methods=methods, tracking={"store_models": False},
                  evaluation={"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 8})
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    assert pruned == ["flap"]
    runs = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]
    assert len(runs) == 4 and sum("prunebench.pruned_by" in r.data.tags for r in runs) == 1


def test_a_worker_paused_past_its_lease_records_nothing_when_it_resumes(tmp_path, model_dir):
    """Fencing: worker A is SIGSTOPped mid-run, B takes the point over (A's run marked KILLED) and finishes it; A,
    resumed, finds its claim token gone and records nothing. Exactly one FINISHED run for the point."""
    import os
    import signal
    import subprocess

    from mlflow.tracking import MlflowClient

    cfg = _config(tmp_path, model_dir, methods=[{"name": "ddp", "params": {"steps": 300, "batch_size": 2,
                                                                          "valid_batches": 1}}])
    workdir = tmp_path / "runs"
    env = os.environ | {"PRUNEBENCH_LEASE_S": "2"}
    cmd = [sys.executable, "-m", "prunebench.cli", "run", str(cfg), "--workdir", str(workdir)]
    a = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:  # wait until A is inside the pruned run
            assert a.poll() is None and time.time() < deadline, a.communicate()[1][-2000:]
            if (workdir / "mlflow.db").is_file():
                client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
                exp = client.get_experiment_by_name("unit")
                if exp and client.search_runs([exp.experiment_id], "tags.`prunebench.kind` = 'pruned' and "
                                              "attributes.status = 'RUNNING'"):
                    break
            time.sleep(0.2)
        a.send_signal(signal.SIGSTOP)
        time.sleep(3)  # past A's lease
        b = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert b.returncode == 0, b.stderr[-2000:]
    finally:
        a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err[-2000:]
    assert "claim was taken over" in err
    runs = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert "ppl.embedded_test_128/32" not in killed.data.metrics  # A recorded nothing after it lost the claim


@pytest.mark.parametrize("store", ["files", "database"])
def test_release_never_removes_a_successors_claim_and_lease_settings_are_checked(store, tmp_path, monkeypatch):
    """Both claim stores: a holder silent past its lease is taken over, is fenced, and its release leaves the
    successor's claim. The database store ages claims by the database's clock (sqlite here: whole seconds)."""
    from suite.errors import ConfigError
    from suite.run.claims import ClaimLost, DatabaseClaims, FileClaims, lease_seconds, wait_seconds

    lease = 0.4 if store == "files" else 1.0
    if store == "files":
        mine, theirs = FileClaims(tmp_path, lease=lease), FileClaims(tmp_path, lease=lease)
    else:
        uri = f"sqlite:///{tmp_path / 'claims.db'}"
        mine, theirs = DatabaseClaims(uri, lease=lease), DatabaseClaims(uri, lease=lease)
    assert mine.acquire("p") and not theirs.acquire("p")  # a live holder excludes
    assert theirs.holder("p")["pid"] == mine.me["pid"]
    mine._stop.set()  # paused: no more heartbeats
    time.sleep(lease + (0.2 if store == "files" else 1.5))
    assert theirs.acquire("p")
    assert not mine.current("p") and theirs.current("p")
    with pytest.raises(ClaimLost):
        mine.fence("p")
    mine.release("p")
    assert theirs.current("p")  # the successor's claim stayed
    theirs.close()
    assert theirs.holder("p") is None and mine.acquire("p")  # released: free again
    mine.close()
    for bad in ("abc", "0", "-5", "inf"):
        for name, read in (("PRUNEBENCH_LEASE_S", lease_seconds), ("PRUNEBENCH_WAIT_S", wait_seconds)):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ConfigError, match=name):
                read()
            monkeypatch.delenv(name)


def test_a_nested_row_left_running_by_a_killed_worker_is_marked_killed_on_resume(tmp_path, model_dir):
    """A worker killed while recording GISP's nested rows leaves the parent and a nested row RUNNING: the resume marks
    both KILLED and finishes fresh ones, so nothing stays RUNNING."""
    cfg = _config(tmp_path, model_dir, methods=[{"name": "gisp", "params": {"iterations": 3, "nested": [0.2]}}],
                  sparsities=[0.4])
    workdir = tmp_path / "runs"
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    t = Tracker(workdir, "unit")
    for r in _runs(workdir):
        if r.data.tags.get("prunebench.kind") == "pruned":
            t.client.update_run(r.info.run_id, status="RUNNING")  # as a SIGKILL mid-nested leaves them
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0
    statuses = sorted(r.info.status for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned")
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


def test_a_waiting_worker_says_what_it_waits_for_and_gives_up_at_its_deadline(tmp_path, monkeypatch, capsys):
    """A point held by a live worker that never finishes (a hung main thread keeps its heartbeat going): the waiting
    worker names the point and its holder once, then gives up after PRUNEBENCH_WAIT_S with one line."""
    import json
    import socket
    import subprocess

    import suite.run.runner as runner
    from suite.errors import PruneBenchError
    from suite.run.claims import FileClaims

    monkeypatch.setenv("PRUNEBENCH_WAIT_S", "0.3")
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.2)
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with FileClaims(tmp_path, lease=60) as claims:
            (claims.dir / "abc.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": hung.pid,
                                                              "token": "t"}))
            waiting = runner.Waiting(claims)
            waiting.on({"tiny/ddp/sp0.5/seed0": "abc"})
            assert f"tiny/ddp/sp0.5/seed0 (held by {socket.gethostname()}:{hung.pid})" in capsys.readouterr().err
            waiting.on({"tiny/ddp/sp0.5/seed0": "abc"})
            with pytest.raises(PruneBenchError, match=r"gave up after 0.3 s \(PRUNEBENCH_WAIT_S\) waiting for tiny/"):
                waiting.on({"tiny/ddp/sp0.5/seed0": "abc"})
    finally:
        hung.kill()
        hung.wait()


def test_a_replaced_folder_is_never_missing_and_leftovers_of_killed_writers_are_cleared(tmp_path):
    """`replacing_dir` swaps in one step; what a writer killed mid-write left (a `.tmp` folder), or killed between
    the fallback's two renames (the old folder moved aside, nothing at the path), is cleared or put back by the next
    writer."""
    import subprocess

    from suite.atomic import replacing_dir

    out = tmp_path / "report"
    with replacing_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with replacing_dir(out) as tmp:
        (tmp / "a.txt").write_text("2")
    assert (out / "a.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    (tmp_path / f".report.{dead}.tmp").mkdir()  # killed while writing
    out.rename(tmp_path / f".report.{dead}.old")  # killed between the two renames
    with replacing_dir(out) as tmp:
        assert (out / "a.txt").read_text() == "2"  # the old report is back at its path before anything else
        (tmp / "a.txt").write_text("3")
    assert (out / "a.txt").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


SIX_POINTS = {"schedule": {"type": "categorical", "choices": ["geometric", "adaptive"]},
              "travel": {"type": "categorical", "choices": [5.0, 10.0, 20.0]}}


def repeats_answered_from_their_twin(trials) -> list:
    """The trials that pruned, after checking that no configuration was pruned twice and that every repeated sample
    carries its twin's number and value."""
    by_number = {t.number: t for t in trials}
    pruned = [t for t in trials if "repeat_of" not in t.user_attrs and t.state.name in ("COMPLETE", "PRUNED")]
    assert len({tuple(sorted(t.params.items())) for t in pruned}) == len(pruned)  # none twice
    for t in trials:
        if "repeat_of" in t.user_attrs:
            twin = by_number[t.user_attrs["repeat_of"]]
            assert twin.params == t.params and twin.number < t.number and twin.value == t.value
    return pruned


def test_tuning_never_prunes_one_configuration_twice(tmp_path, model_dir, capsys):
    """The review's F6: 12 trials over a 6-point space on SQLite. Each configuration is pruned once; a repeated
    sample is answered from its earlier twin (its value, `repeat_of`), and the budget line counts distinct ones."""
    import optuna

    from suite.run.tuning import storage_uri

    cfg = _config(tmp_path, model_dir)
    workdir = tmp_path / "runs"
    overrides = ["tuning.n_trials=12", "tuning.report_every=100", "methods.1.params.steps=4",
                 f"tuning.search_space={{ddp: {json.dumps(SIX_POINTS)}}}"]
    assert main(["tune", str(cfg), "--workdir", str(workdir), *(x for o in overrides for x in ("--set", o))]) == 0
    (summary,) = optuna.get_all_study_summaries(storage_uri(workdir))
    trials = optuna.load_study(study_name=summary.study_name, storage=storage_uri(workdir)).trials
    assert len(trials) == 12
    pruned = repeats_answered_from_their_twin(trials)
    assert len(pruned) <= 6 and len(trials) - len(pruned) >= 6
    mlflow_trials = [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "trial"]
    assert len(mlflow_trials) == len(pruned)  # a repeat prunes nothing, so records no run
    assert f"{len(pruned)} distinct configurations pruned" in capsys.readouterr().out
