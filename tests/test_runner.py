"""The orchestrator: grid, identity, skip FINISHED, FAILED recorded without stopping, MLflow layout."""

from __future__ import annotations

import pytest
import yaml

from suite.cli import main
from suite.config import load_experiment
from suite.runner import Runner, expand
from suite.testing import tiny_text_model
from suite.tracking import Tracker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("m") / "tiny")


def _config(tmp_path, model_dir, **extra):
    cfg = {
        "name": "unit",
        "models": [str(model_dir)],
        "methods": [{"name": "random"}, {"name": "ddp", "params": {"steps": 4, "batch_size": 2, "valid_batches": 1}}],
        "sparsities": [0.3],
        "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
        "evaluation": {"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 12},
    } | extra
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_tune_resumes_one_study_and_feeds_run(tmp_path, model_dir):
    import json

    import optuna

    from suite.tuning import storage_uri

    overrides = ["tuning.n_trials=3", "tuning.report_every=2", "methods.1.params.steps=6"]
    cfg = _config(tmp_path, model_dir)
    workdir = tmp_path / "runs"
    assert main(["tune", str(cfg), "--workdir", str(workdir), *(x for o in overrides for x in ("--set", o))]) == 0
    assert main(["tune", str(cfg), "--workdir", str(workdir), *(x for o in overrides for x in ("--set", o))]) == 0
    (study,) = optuna.get_all_study_summaries(storage_uri(workdir))
    assert study.n_trials == 6  # the second invocation resumed the same study
    best = json.loads(next((workdir / "tuned").rglob("*.json")).read_text())
    assert set(best["best_params"]) == {"schedule", "mu_start", "mu_end", "target_warmup", "lr"}
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


def test_killed_sweep_resumes_with_only_the_missing_runs(tmp_path, model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = _config(tmp_path, model_dir)
    workdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "suite.cli", "run", str(cfg), "--workdir", str(workdir),
           "--set", "methods.1.params.steps=150"]  # the second run is long enough to be killed inside

    def finished():
        return [r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"
                and r.info.status == "FINISHED"]

    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ((workdir / "mlflow.db").exists() and finished()):
        time.sleep(1)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
    first = finished()
    assert [r.data.params["method"] for r in first] == ["random"], log.read_text()[-3000:]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    done = finished()
    assert sorted(r.data.params["method"] for r in done) == ["ddp", "random"]
    assert next(r for r in done if r.data.params["method"] == "random").info.run_id == first[0].info.run_id


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
    assert nested.data.tags["prunebench.nested_in"] == parent.data.tags["prunebench.identity"]
    assert abs(nested.data.metrics["sparsity"] - 0.2) < 0.05 and nested.data.metrics["sparsity"] < 0.4
    assert main(["run", str(cfg), "--workdir", str(workdir)]) == 0  # resumed: nothing new
    assert len([r for r in _runs(workdir) if r.data.tags.get("prunebench.kind") == "pruned"]) == 2
