from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from prunebench.cli import main
from suite.model.compact import load_pruned
from suite.testing import tiny_model


@pytest.fixture
def model_dir(tmp_path, family):
    d = tmp_path / "dense"
    tiny_model(family).save_pretrained(d)
    return d


def test_prune_writes_the_contracted_layout(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "random", "--sparsity", "0.5", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "target", "sparsity", "total_sparsity", "params_dense", "params_compact",
                "prune_seconds", "seed"):
        assert key in metrics
    assert abs(metrics["sparsity"] - 0.5) < 0.05
    assert (out / "masks.safetensors").is_file() and (out / "masks.json").is_file()
    reloaded = load_pruned(out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == metrics["params_compact"]
    assert "random: sparsity" in capsys.readouterr().out


def test_prune_with_overrides_and_constraints(tmp_path):
    d = tmp_path / "dense"
    tiny_model("qwen3").save_pretrained(d)
    out = tmp_path / "p"
    args = ["prune", "--model", str(d), "--method", "magnitude", "--sparsity", "0.3", "--uniform",
            "--granularity", "query_head", "--set", "selection=global", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hyperparameters"]["selection"] == "global" and metrics["target"]["uniform"]
    assert metrics["granularity"] == "query_head"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nosuch", "--sparsity", "0.5"], "unknown method 'nosuch'"),
        (["--method", "random", "--sparsity", "1.5"], "target.sparsity"),
        (["--method", "random", "--sparsity", "0.5", "--set", "bogus=1"], "random.bogus: unknown key"),
        (["--method", "random", "--sparsity", "0.5", "--granularity", "layer"], "granularity"),
        (["--method", "random", "--sparsity", "abc"], "invalid float"),
    ],
)
def test_bad_input_is_one_error_line_and_nonzero_exit(tmp_path, args, message):
    d = tmp_path / "dense"
    tiny_model("llama").save_pretrained(d)
    cmd = [sys.executable, "-m", "prunebench.cli", "prune", "--model", str(d), *args, "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_and_unsupported_family(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    assert main(["inspect", "--model", str(tmp_path / "g")]) == 2
    assert "unsupported model family 'gpt2'" in capsys.readouterr().err


def test_hub_model_offline_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["inspect", "--model", "someone/not-cached-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Hugging Face hub") and "\n" not in err


def test_methods_and_inspect_list_what_exists(tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "magnitude" in out and "selection" in out
    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    assert main(["inspect", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "family mixtral" in out and "L00.expert003" in out and "prunable" in out
    config = tiny_model("mixtral").config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    assert f"heads {heads}  KV heads {kv} ({heads // kv} query heads per KV group)" in out
    assert f"head_dim {config.hidden_size // heads}" in out and "tied embeddings no" in out
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    assert main(["inspect", "--model", str(tmp_path / "tied")]) == 0
    assert "tied embeddings yes" in capsys.readouterr().out
    torch.manual_seed(0)


@pytest.mark.parametrize("family", ["llama"])
def test_prune_out_refuses_a_foreign_folder_and_replaces_its_own_output(model_dir, tmp_path, capsys):
    args = ["prune", "--model", str(model_dir), "--method", "random", "--sparsity", "0.5", "--out"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("months of work")
    capsys.readouterr()
    assert main([*args, str(foreign)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: --out {foreign}") and "did not write" in err[0], err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "months of work"
    out = tmp_path / "pruned"
    assert main([*args, str(out)]) == 0
    first = (out / "masks.safetensors").read_bytes()
    assert main([*args, str(out), "--seed", "1"]) == 0  # its own earlier output: replaced, no flag
    assert (out / "masks.safetensors").read_bytes() != first
    assert main(["eval", "--model", str(out / "model"), "--tasks", "", "--ppl", "embedded:test@64/4",
                 "--json", str(foreign / "thesis.tex")]) == 2
    assert (foreign / "thesis.tex").read_text() == "months of work"


def test_an_output_written_before_markers_is_still_recognised(tmp_path):
    from suite.outputs import check_dir

    old = tmp_path / "report"
    old.mkdir()
    for name in ("index.html", "report.json", "results.csv"):
        (old / name).write_text("x")
    check_dir(old, "report")  # replaced without a flag
    with pytest.raises(Exception, match="prunebench report output"):
        check_dir(old, "prune")


def test_ui_stops_its_mlflow_server_on_sigterm(tmp_path):
    """SIGTERM to `prunebench ui` stops the whole server (its own process group): nothing is left on the port."""
    import os
    import signal
    import socket
    import time

    from suite.run.tracking import Tracker

    Tracker(tmp_path / "w", "x")  # a store to serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "prunebench.cli", "ui", "--workdir", str(tmp_path / "w"), "--port",
                           str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.time() + 120
    while not listening():
        assert ui.poll() is None and time.time() < deadline, ui.stderr.read().decode()[-2000:]
        time.sleep(0.5)
    server = int(subprocess.run(["ps", "-o", "pid=", "--ppid", str(ui.pid)], capture_output=True,
                                text=True).stdout.split()[0])
    group = os.getpgid(server)
    assert group != os.getpgid(ui.pid)
    ui.send_signal(signal.SIGTERM)
    ui.wait(timeout=60)
    deadline = time.time() + 30
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "the MLflow server outlived prunebench ui"
        time.sleep(0.5)
    assert not listening()


def test_methods_shows_types_choices_and_defaults_and_the_cli_has_a_version(capsys):
    assert main(["methods", "ddp", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["forward_map"]["choices"] == ["relu", "identity", "clamp"]
    assert info["settings"]["lr"]["type"] == "float or null" and info["settings"]["steps"]["default"] == 300
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "PydanticUndefined" not in listing and "nested (list[float]) = []" in listing
    assert main(["methods", "wanda"]) == 2
    assert "did you mean wanda_sp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("prunebench ")


def test_a_key_typo_gets_did_you_mean(tmp_path, capsys):
    d = tmp_path / "dense"
    tiny_model("llama").save_pretrained(d)
    assert main(["prune", "--model", str(d), "--method", "slimgpt", "--sparsity", "0.3", "--set", "round=8",
                 "--out", str(tmp_path / "o")]) == 2
    assert "slimgpt.round: unknown key; did you mean rounds?" in capsys.readouterr().err


def test_out_dot_and_a_huge_seed_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "dense"
    tiny_model("llama").save_pretrained(d)
    for extra in (["--out", "."], ["--out", str(tmp_path / "o"), "--seed", str(2**70)]):
        capsys.readouterr()
        with contextlib.suppress(SystemExit):
            assert main(["prune", "--model", str(d), "--method", "random", "--sparsity", "0.3", *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_a_logged_run_says_each_grid_point_and_beats_during_a_prune(tmp_path, capsys, monkeypatch):
    """Where no progress bar shows (standard error not a terminal: a log file, nohup, CI), `run` says one line per
    finished grid point, in order, with its numbers and an ETA, a heartbeat during a long prune, and `already done`
    for a point a resumed run finds; `--quiet` says none of it."""
    import re

    from suite.testing import tiny_experiment, tiny_text_model

    monkeypatch.setenv("PRUNEBENCH_HEARTBEAT_S", "0")  # a heartbeat at every step of the 4-step prune
    path = tiny_experiment(tmp_path, tiny_text_model(tmp_path / "tiny"))
    capsys.readouterr()
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err.splitlines()
    points = [line for line in err if line.startswith("[")]
    assert len(points) == 2
    point = r"\[(\d)/2\] \S+ (\S+) sp=0\.3 seed=0: ppl [\d.]+, acc [\d.]+, prune [\d.]+ s"
    assert [re.fullmatch(point + r"( \(eta \d+ s\))?", line).group(1, 2) for line in points] == [("1", "random"),
                                                                                                ("2", "ddp")]
    beats = [line for line in err if line.startswith("  ddp: step")]
    assert len(beats) == 4 and all(re.fullmatch(r"  ddp: step \d/4, hard sparsity [\d.]+ \(target [\d.]+\), "
                                                r"loss [\d.]+", line) for line in beats)
    assert err.index(beats[-1]) < err.index(points[1])  # the beats come while the point runs
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 0
    assert [line.endswith("already done") for line in capsys.readouterr().err.splitlines()] == [True, True]
    assert main(["--quiet", "run", str(path), "--workdir", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().err == ""


def test_validate_warns_when_kv_groups_are_too_coarse_for_the_target(tmp_path, caplog):
    """The real-model review: 3 KV groups per layer and 20% per layer removed a third of the heads in most layers,
    silently. validate (and run, through the same preflight) says so, and what query_head units would do."""
    import json
    import logging

    from suite.testing import tiny_experiment, tiny_text_model

    model = tiny_text_model(tmp_path / "m", family="qwen3")
    config = json.loads((model / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    path = tiny_experiment(tmp_path, model, sparsities=[0.1, 0.5])
    with caplog.at_level(logging.WARNING):
        assert main(["validate", str(path), "--workdir", str(tmp_path / "w")]) == 0
    assert not [r for r in caplog.records if "kv_group" in r.getMessage()]  # 2 groups: 0% vs 10% is close enough
    path = tiny_experiment(tmp_path, model, sparsities=[0.15])
    with caplog.at_level(logging.WARNING):
        assert main(["validate", str(path), "--workdir", str(tmp_path / "w")]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "kv_group" in r.getMessage()]
    assert "lose 0% of its heads, not 15%" in warning and "query_head (4 units per layer) would remove 25%" in warning
