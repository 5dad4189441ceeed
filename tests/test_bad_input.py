"""Issue "Reliability": every kind of bad input ends `prunebench run` with one `error:` line naming the cause and a
non-zero exit, and leaves what the store already holds as it was."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import torch
import yaml

from prunebench.cli import main
from suite.run.tracking import Tracker
from suite.testing import tiny_text_model


def _config(model, **extra):
    return {"name": "bad", "models": [str(model)], "methods": [{"name": "random"}], "sparsities": [0.3],
            "calibration": {"n": 4, "seq_len": 32, "valid_n": 0},
            "evaluation": {"ppl": ["embedded:test@128/8"], "tasks": ["pb_next_line"], "limit": 4}} | extra


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workdir holding one finished sweep, and a tiny model."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_text_model(root / "tiny")
    (root / "ok.yaml").write_text(yaml.safe_dump(_config(model)))
    assert main(["run", str(root / "ok.yaml"), "--workdir", str(root / "w")]) == 0
    return root, model


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection this process attempts, recorded and refused: a test that expects none asserts the
    list is empty (HF_HUB_OFFLINE must keep prunebench off the network, not a timeout)."""
    import socket

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(111, "refused by the test's network guard")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _snapshot(workdir):
    files = sorted(p for p in workdir.rglob("*") if p.is_file() and "claims" not in p.parts
                   and p.name != ".tracking.lock")
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _gpt2(root):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = root / "gpt2"
    if not path.exists():
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    return path


CASES = {
    "malformed YAML": (lambda root, model: "name: [unclosed\n", "YAML"),
    "unknown key": (lambda root, model: _config(model, bogus=1), "bogus"),
    "unknown method": (lambda root, model: _config(model, methods=[{"name": "nosuch"}]), "unknown method 'nosuch'"),
    "unknown hyperparameter": (lambda root, model: _config(model, methods=[{"name": "ddp", "params": {"lr0": 1}}]),
                               "lr0"),
    "unknown model": (lambda root, model: _config(model, models=[str(root / "missing")]), "does not exist"),
    "unknown task": (lambda root, model: _config(model, evaluation={"tasks": ["no_such_task"],
                                                                    "ppl": ["embedded:test@128/8"]}), "no_such_task"),
    "sparsity above 1": (lambda root, model: _config(model, sparsities=[1.5]), "outside (0, 1)"),
    "sparsity 0": (lambda root, model: _config(model, sparsities=[0.0]), "outside (0, 1)"),
    "unsupported architecture": (lambda root, model: _config(model, models=[str(_gpt2(root))]),
                                 "unsupported model family 'gpt2'"),
    "hub model offline": (lambda root, model: _config(model, models=["someone/not-cached-model"]),
                          "cannot reach the Hugging Face hub"),
    "hub dataset offline": (lambda root, model: _config(model, calibration={"source": "wikitext2", "seq_len": 32}),
                            "cannot load data set 'wikitext2'"),
    "evaluation data set offline": (lambda root, model: _config(model, evaluation={"ppl": ["wikitext2:test@128"]}),
                                    "cannot load data set 'wikitext2'"),
    "zoo typo": (lambda root, model: _config(model, models=["zoo:tiny-lama"]), "tiny-lama"),
    "tyr with a uniform target": (lambda root, model: _config(model, methods=[{"name": "tyr"}],
                                                              target={"uniform": True}), "methods.tyr: tyr searches"),
    "wrong tuning label": (lambda root, model: _config(model, tuning={"methods": ["ddp_tunned"]}),
                           "tuning.methods: ['ddp_tunned'] are not method labels"),
    "wrong search-space parameter": (
        lambda root, model: _config(model, methods=[{"name": "ddp"}],
                                    tuning={"search_space": {"ddp": {"mu_endd": {"type": "float", "low": 1,
                                                                                  "high": 2}}}}),
        "['mu_endd'] are not ddp hyperparameters"),
    "tuned without a tuning result": (lambda root, model: _config(model, methods=[{"name": "ddp", "tuned": True}]),
                                      "tuned: true but no tuning result"),
    "window beyond the model's positions": (lambda root, model: _config(model, evaluation={
        "ppl": ["embedded:test@4096/2"]}), "4096 tokens is beyond the model's 128 positions"),
    "experiment name ..": (lambda root, model: _config(model, name=".."), "not a path"),
    "seed beyond 64 bits": (lambda root, model: _config(model, seeds=[2**70]), "seeds.0"),
    "tracking.experiment outside the workdir": (lambda root, model: _config(model, tracking={
        "experiment": "../../../x"}), "not a path"),
    "unknown recovery setting": (lambda root, model: _config(model, recovery={"step": 5}), "recovery.step: unknown"),
    "recovery on the test split": (lambda root, model: _config(model, recovery={"data": {"split": "test"}}),
                                   "recovery.data.split: the test split is reserved"),
    "empty target units": (lambda root, model: _config(model, target={"units": []}),
                           "target.units: an empty list"),
    "unknown unit kind": (lambda root, model: _config(model, target={"units": ["heads"]}), "target.units.0"),
    "unit kind the model lacks": (lambda root, model: _config(model, target={"units": ["attention", "expert"]}),
                                  "target.units: this llama model has no expert units"),
    "unknown preset": (lambda root, model: _config(model, methods=[{"name": "ddp", "params": {"preset": "fast"}}]),
                       "unknown preset 'fast'"),
    "truncated model.safetensors": (lambda root, model: _config(model, models=[str(_truncated_copy(root, model))]),
                                    "a damaged safetensors file model.safetensors"),
    "method label outside the workdir": (lambda root, model: _config(model, methods=[{"name": "random",
                                                                                       "label": "../x"}]),
                                         "not a path"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_the_store_changes(store, case, tmp_path, monkeypatch, capsys, no_network):
    """`validate` and `run` give the same one refusal; neither changes an existing store or creates a new one, and
    none of them attempts a network connection (offline means no connection, not a quick timeout)."""
    root, model = store
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make, message = CASES[case]
    content = make(root, model)
    path = tmp_path / "exp.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    before = _snapshot(root / "w")
    refusals = {}
    for command, workdir in (("validate", root / "w"), ("run", root / "w"), ("run", tmp_path / "fresh")):
        capsys.readouterr()
        assert main([command, str(path), "--workdir", str(workdir)]) == 2, command
        assert no_network == [], (command, no_network)
        refusals[command, workdir] = _one_error_line(capsys, message)
    assert refusals["validate", root / "w"] == refusals["run", root / "w"]
    assert _snapshot(root / "w") == before
    assert not (tmp_path / "fresh").exists()


def test_an_interrupted_download_is_not_mistaken_for_a_cached_model(store, tmp_path, monkeypatch, capsys):
    """A half-downloaded hub model (blob `.incomplete`, no snapshot) offline: the same one-line hub error."""
    root, model = store
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--someone--partial"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd.incomplete").write_bytes(b"{\"model_t")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, models=["someone/partial"])))
    assert main(["run", str(path), "--workdir", str(root / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Hugging Face hub") and "\n" not in err


def _failed_runs(workdir, name):
    t = Tracker(workdir, name)
    return [r for r in t.client.search_runs([t.experiment_id]) if r.data.tags.get("prunebench.kind") == "pruned"]


def test_nan_in_mask_training_is_one_failed_run_with_its_cause(tmp_path, capsys):
    """A checkpoint with a NaN weight: mask training stops at its first non-finite loss, the run is FAILED with a
    one-line cause, and the sweep exits non-zero."""
    from transformers import AutoModelForCausalLM

    model = tiny_text_model(tmp_path / "tiny")
    broken = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(model)
    cfg = _config(model, name="nan", methods=[{"name": "ddp", "params": {"steps": 4, "batch_size": 2,
                                                                        "valid_batches": 1}}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 1
    assert "error: 1 of 1 runs FAILED" in capsys.readouterr().err
    (run,) = _failed_runs(tmp_path / "w", "nan")
    assert run.info.status == "FAILED"
    error = run.data.tags["prunebench.error"]
    assert "\n" not in error and "loss became nan" in error, error


def test_a_failing_artifact_store_is_one_line_and_a_resume_finishes_the_sweep(store, tmp_path, capsys):
    """The artifact store refuses writes (a file where the experiment's folder goes): the sweep stops at the first
    write, the dense run is FAILED with the cause, nothing looks FINISHED; once the store is fixed a resume runs."""
    _, model = store
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, name="art")))
    blocker = tmp_path / "w" / "mlartifacts" / "art"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the artifact folder goes")
    capsys.readouterr()
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot write to the artifact store" in err[0], err
    t = Tracker(tmp_path / "w", "art")
    runs = t.client.search_runs([t.experiment_id])
    assert not [r for r in runs if r.data.tags.get("prunebench.kind") and r.info.status == "FINISHED"]
    blocker.unlink()
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 0
    runs = t.client.search_runs([t.experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.data.tags.get("prunebench.kind", "parent") for r in runs) == ["dense", "parent", "pruned"]


@pytest.mark.parametrize("where", ["artifact", "database"])
def test_a_full_disk_is_one_line_the_run_failed_the_parent_closed_and_a_resume_finishes(store, where, tmp_path,
                                                                                      monkeypatch, capsys):
    """The review's F2: a write of the second grid point runs out of space (the artifact copy: ENOSPC; the tracking
    database: SQLite's "database or disk is full", as MLflow wraps it). One error line naming the path and the free
    space, exit 2; that run FAILED with its cause, the parent closed (not RUNNING), nothing else touched; the next
    `run` resumes and finishes the sweep."""
    import errno

    from mlflow.exceptions import MlflowException

    _, model = store
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, name="full", methods=[{"name": "random"}, {"name": "magnitude"}])))
    workdir = tmp_path / "w"
    calls = {"n": 0}
    if where == "artifact":
        original = Tracker.log_artifacts

        def full(self, run_id, directory, artifact_path=None):
            calls["n"] += 1
            if calls["n"] == 3:  # dense's evaluation.json, random's artifacts, then magnitude's
                raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "mlartifacts" / "x"))
            return original(self, run_id, directory, artifact_path)

        monkeypatch.setattr(Tracker, "log_artifacts", full)
    else:
        original = Tracker.log

        def full(self, run_id, params=None, metrics=None, tags=None):
            if metrics and "params_compact" in metrics:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise MlflowException("(sqlite3.OperationalError) database or disk is full")
            return original(self, run_id, params=params, metrics=metrics, tags=tags)

        monkeypatch.setattr(Tracker, "log", full)
    capsys.readouterr()
    assert main(["--quiet", "run", str(path), "--workdir", str(workdir)]) == 2
    line = _one_error_line(capsys, "no space to write", "MiB free", "resume")
    assert (str(workdir / "mlartifacts" / "x") if where == "artifact" else str(workdir)) in line
    t = Tracker(workdir, "full")
    runs = t.client.search_runs([t.experiment_id])
    status = sorted((r.data.tags.get("prunebench.kind", "parent"), r.info.status) for r in runs)
    assert status == [("dense", "FINISHED"), ("parent", "FAILED"), ("pruned", "FAILED"), ("pruned", "FINISHED")]
    failed = next(r for r in runs if r.info.status == "FAILED" and r.data.tags.get("prunebench.kind"))
    assert "full" in failed.data.tags["prunebench.error"] or "space" in failed.data.tags["prunebench.error"]
    monkeypatch.undo()
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0
    done = t.client.search_runs([t.experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.data.params.get("method", "parent") for r in done) == ["dense", "magnitude", "parent", "random"]


@pytest.mark.parametrize("case", ["unknown model", "wrong tuning label", "wrong search-space parameter"])
def test_tune_refuses_before_creating_any_store(store, case, tmp_path, capsys):
    root, model = store
    make, message = CASES[case]
    config = make(root, model)
    if case == "unknown model":
        config["methods"] = [{"name": "ddp"}]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["tune", str(path), "--workdir", str(tmp_path / "fresh")]) == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "fresh").exists()


def test_an_unreachable_hub_is_one_line_in_seconds(store, tmp_path, monkeypatch, capsys):
    """With HF_HUB_OFFLINE unset, a hub model is looked for on the hub's host: where nobody answers (here the hub
    is pointed at this machine's loopback address) the refusal is one line within the connect timeout, and the only
    connection attempted was that loopback probe."""
    import socket

    from suite.hub import CONNECT_TIMEOUT_S

    _, model = store
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    attempts = []
    connect = socket.socket.connect

    def loopback_only(self, address, *args, **kwargs):
        attempts.append(address)
        assert address[0] == "127.0.0.1", f"a connection to {address} was attempted"
        return connect(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, models=["someone/not-cached-model"])))
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["validate", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert time.perf_counter() - started < CONNECT_TIMEOUT_S + 30
    assert _one_error_line(capsys).startswith("error: cannot reach the Hugging Face hub (127.0.0.1)")
    assert attempts and {a[0] for a in attempts} == {"127.0.0.1"}


def _truncated_copy(root, model):
    """The review's F1: a copy of the model whose model.safetensors lost its last two thirds."""
    import shutil

    path = root / "truncated"
    if not path.exists():
        shutil.copytree(model, path)
        _truncate(path / "model.safetensors")
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _one_error_line(capsys, *words):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err
    return err[0]


def test_damaged_files_are_one_line_and_change_nothing(store, tmp_path, capsys, no_network):
    """The review's damaged-file cases: a truncated model.safetensors (prune, eval, inspect, run), a truncated
    mlflow.db (run, report: refused, never set aside as if empty), one truncated mask artifact (report: the file
    named); each exits 2 with one line and leaves every file as it was."""
    import shutil

    root, model = store
    bad_model = tmp_path / "bad_model"
    shutil.copytree(model, bad_model)
    _truncate(bad_model / "model.safetensors")
    for args in (["prune", "--model", str(bad_model), "--method", "random", "--sparsity", "0.3", "--out",
                  str(tmp_path / "o")],
                 ["eval", "--model", str(bad_model), "--ppl", "embedded:test@64/2", "--tasks", "pb_next_line"],
                 ["inspect", "--model", str(bad_model)]):
        capsys.readouterr()
        assert main(args) == 2, args
        _one_error_line(capsys, "damaged safetensors", str(bad_model))
    assert not (tmp_path / "o").exists()

    damaged = tmp_path / "damaged_db"
    shutil.copytree(root / "w", damaged)
    _truncate(damaged / "mlflow.db")
    before = _snapshot(damaged)
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump(_config(model)))
    for args in (["run", str(cfg), "--workdir", str(damaged)],
                 ["report", "--experiment", "bad", "--workdir", str(damaged), "--out", str(tmp_path / "r1")]):
        capsys.readouterr()
        assert main(args) == 2, args
        _one_error_line(capsys, "mlflow.db")
    assert _snapshot(damaged) == before and not (tmp_path / "r1").exists()
    assert not list(damaged.glob("mlflow.db.broken-*"))

    mask = tmp_path / "damaged_mask"
    shutil.copytree(root / "w", mask)
    (victim,) = list(mask.rglob("masks.safetensors"))[:1]
    _truncate(victim)
    before = _snapshot(mask)
    capsys.readouterr()
    assert main(["report", "--experiment", "bad", "--workdir", str(mask), "--out", str(tmp_path / "r2")]) == 2
    _one_error_line(capsys, "damaged artifact", str(victim))
    assert _snapshot(mask) == before and not (tmp_path / "r2").exists()


def test_checkpoint_code_never_runs_without_the_flag(store, tmp_path, capsys, monkeypatch):
    """A checkpoint of a foreign model type whose config names its own code (`auto_map`): without
    --trust-remote-code there is no prompt (stdin says y), one line, and the code never runs; with the flag it runs."""
    import io
    import json
    import shutil

    _, model = store
    evil = tmp_path / "evil"
    shutil.copytree(model, evil)
    config = json.loads((evil / "config.json").read_text())
    config |= {"model_type": "evilnet", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"}}
    (evil / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "ran"
    (evil / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    for command in (["inspect", "--model", str(evil)],
                    ["eval", "--model", str(evil), "--ppl", "embedded:test@64/2", "--tasks", ""],
                    ["prune", "--model", str(evil), "--method", "random", "--sparsity", "0.3", "--out",
                     str(tmp_path / "o")]):
        capsys.readouterr()
        assert main(command) == 2, command
        _one_error_line(capsys, "--trust-remote-code")
        assert not sentinel.exists(), command
    assert main(["inspect", "--model", str(evil), "--trust-remote-code"]) == 2  # ran, then: not a supported family
    _one_error_line(capsys, "unsupported model family 'evilnet'")
    assert sentinel.exists()


@pytest.mark.parametrize("name", ["PRUNEBENCH_LEASE_S", "PRUNEBENCH_WAIT_S"])
def test_a_malformed_claim_setting_is_one_line_before_the_store(store, name, tmp_path, monkeypatch, capsys):
    root, model = store
    monkeypatch.setenv(name, "abc")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model)))
    before = _snapshot(root / "w")
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(path), "--workdir", str(root / "w")]) == 2
        _one_error_line(capsys, name)
    assert _snapshot(root / "w") == before


def test_workdirs_that_cannot_be_folders_and_bad_ports_are_one_line(store, tmp_path, capsys):
    """F3 and F4: a workdir that is a file or lies under one, and a UI port out of range or taken, are refused with
    one line and exit 2 (no traceback, nothing created)."""
    import socket

    root, model = store
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model)))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for command in ("validate", "run", "tune"):
        for workdir, words in ((afile, "is a file"), (afile / "sub", "lies under")):
            capsys.readouterr()
            assert main([command, str(path), "--workdir", str(workdir)]) == 2
            _one_error_line(capsys, words)
    assert afile.read_text() == "not a folder"
    capsys.readouterr()
    assert main(["ui", "--workdir", str(root / "w"), "--port", "99999"]) == 2
    _one_error_line(capsys, "outside 1..65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["ui", "--workdir", str(root / "w"), "--port", str(taken.getsockname()[1])]) == 2
        _one_error_line(capsys, "is not free")


def test_a_grid_above_max_runs_needs_yes(store, tmp_path, capsys):
    """F5: a grid larger than `max_runs` is refused by run (before the store changes) unless --yes; validate says
    the count and warns."""
    root, model = store
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, seeds=[0, 1, 2], max_runs=2)))
    before = _snapshot(root / "w")
    assert main(["run", str(path), "--workdir", str(root / "w")]) == 2
    _one_error_line(capsys, "the grid has 3 runs, more than max_runs 2: run with --yes")
    assert _snapshot(root / "w") == before
    assert main(["validate", str(path), "--workdir", str(root / "w")]) == 0
    out = capsys.readouterr()
    assert "3 runs is more than max_runs 2" in out.err
    # the store has run this model and method: its median run time, times three
    assert re.search(r"estimated time: \d+ min for 3 of the 3 runs", out.out), out.out
    assert main(["validate", str(path), "--workdir", str(tmp_path / "w2")]) == 0
    assert "estimated time: unknown" in capsys.readouterr().out and not (tmp_path / "w2").exists()
    assert main(["run", str(path), "--workdir", str(tmp_path / "w2"), "--yes"]) == 0


def test_user_text_is_safe_in_every_csv_and_markdown_output(tmp_path, capsys):
    """A label that is a spreadsheet formula and a model folder named with HTML and a pipe: quoted in every CSV,
    escaped in every Markdown table (JSON keeps the data as it is)."""
    import pandas as pd

    model = tiny_text_model(tmp_path / "m <b>x</b> | y")
    capsys.readouterr()  # the model's save progress
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_config(model, methods=[{"name": "random", "label": '=HYPERLINK("x")'}])))
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 2  # a label is one plain name
    _one_error_line(capsys, "must be one plain name")
    path.write_text(yaml.safe_dump(_config(model, methods=[{"name": "random", "label": "=1+1"}])))
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 0
    out = tmp_path / "report"
    assert main(["report", "--experiment", "bad", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    board = tmp_path / "board"
    assert main(["leaderboard", "--experiment", "bad", "--workdir", str(tmp_path / "w"), "--out", str(board)]) == 0
    csvs = [*out.rglob("*.csv"), *board.rglob("*.csv")]
    assert len(csvs) >= 4
    for csv in csvs:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        for value in frame.to_numpy().ravel():
            assert not value.startswith(("=", "+", "@")), (csv.name, value)
    labelled = [c for c in csvs if "'=1+1" in c.read_text()]
    assert labelled, "the label is kept, behind a quote"
    rows_with_the_path = 0
    for md in [*out.rglob("*.md"), *board.rglob("*.md")]:
        text = md.read_text()
        assert "<b>" not in text, md.name
        for line in text.splitlines():
            if line.startswith("|") and "x&lt;/b&gt;" in line:
                assert "x&lt;/b&gt; \\| y" in line, (md.name, line)  # the pipe does not end the cell
                rows_with_the_path += 1
    assert rows_with_the_path
