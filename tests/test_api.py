"""The Python API runs the CLI's code paths: the same model, method, seed and calibration give the same compact
model and the same numbers as `prunebench prune` and `prunebench eval`."""

from __future__ import annotations

import json

import pytest
import torch

import prunebench
from prunebench.cli import main
from suite.errors import PruneBenchError
from suite.model.compact import load_pruned
from suite.model.load import load_model
from suite.testing import tiny_text_model

CALIBRATION = ["--calib", "n=8", "--calib", "seq_len=32", "--calib", "valid_n=0"]


def test_prune_and_evaluate_match_the_cli(tmp_path):
    source = tiny_text_model(tmp_path / "m")
    out = tmp_path / "cli"
    assert main(["prune", "--model", str(source), "--method", "wanda_sp", "--sparsity", "0.3", "--seed", "1",
                 *CALIBRATION, "--out", str(out)]) == 0
    model, tokenizer = load_model(str(source))
    pruned, report = prunebench.prune(model, tokenizer, method="wanda_sp", sparsity=0.3, seed=1,
                                      calibration={"n": 8, "seq_len": 32, "valid_n": 0})
    cli = json.loads((out / "metrics.json").read_text())
    assert report["calibration_hash"] == cli["calibration_hash"] and report["params_compact"] == cli["params_compact"]
    assert report["weights_changed"] is False
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, load_pruned(out / "model")(ids).logits)
    scores = prunebench.evaluate(pruned, tokenizer, ppl=["embedded:test@64/4"], tasks=["pb_next_line"], limit=6)
    assert main(["eval", "--model", str(out / "model"), "--ppl", "embedded:test@64/4", "--tasks", "pb_next_line",
                 "--limit", "6", "--json", str(tmp_path / "eval.json")]) == 0
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert scores["ppl"]["embedded:test@64/4"]["ppl"] == pytest.approx(stored["ppl"]["embedded:test@64/4"]["ppl"])
    assert scores["tasks"]["pb_next_line"]["items"] == stored["tasks"]["pb_next_line"]["items"]
    assert scores["protocol"]["hash"] == stored["protocol"]["hash"]


def test_bad_settings_are_the_cli_s_one_line_errors(tmp_path):
    model, tokenizer = load_model(str(tiny_text_model(tmp_path / "m")))
    with pytest.raises(PruneBenchError, match=r"wanda_sp\.bogus: unknown key"):
        prunebench.prune(model, tokenizer, method="wanda_sp", sparsity=0.3, bogus=1)
    with pytest.raises(PruneBenchError, match="needs calibration text"):
        prunebench.prune(model, None, method="wanda_sp", sparsity=0.3)
    with pytest.raises(PruneBenchError, match="unknown method"):
        prunebench.prune(model, tokenizer, method="nosuch", sparsity=0.3)
    with pytest.raises(PruneBenchError, match=r"target\.sparsity"):
        prunebench.prune(model, tokenizer, method="magnitude", sparsity=1.5)
