"""End-to-end checks on the trained zoo: the embedded evaluation is real, sensitive, and agrees with lm-eval."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from prunebench.cli import main
from suite.data.calibration import CalibrationSpec
from suite.data.sources import embedded_corpus, token_stream
from suite.evaluation.evaluate import EvalSpec, PplSpec, evaluate, perplexity
from suite.methods.pruner import get_method
from suite.model.load import load_model
from suite.model.masks import Target
from suite.run.pipeline import prune_model

pytestmark = pytest.mark.slow
ZOO = "zoo:tiny-llama"


def test_eval_command_reports_perplexity_tasks_and_fingerprint(tmp_path, capsys):
    # 100 items a task and 128 perplexity windows keep CI short; the full 500 items and test split (what
    # `prunebench eval` does by default) score .52-.54, in README
    out = tmp_path / "out.json"
    assert main(["eval", "--model", ZOO, "--json", str(out), "--limit", "100", "--ppl", "embedded:test@256/128"]) == 0
    result = json.loads(out.read_text())
    assert 1 < result["ppl"]["embedded:test@256/128"]["ppl"] < 30
    assert len(result["tasks"]) >= 3
    for task, r in result["tasks"].items():
        assert r["acc"] >= 0.40, task  # chance is 0.25: at least 15 points above
        assert r["acc"] < 1.0 and r["n"] == 100
    proto = result["protocol"]
    assert proto["lm_eval"] and proto["hash"] and all(t["data_hash"] for t in proto["tasks"].values())
    assert "mean acc" in capsys.readouterr().out


def test_random_pruning_damage_is_visible_to_the_embedded_evaluation():
    spec = EvalSpec(limit=100, ppl=(PplSpec(windows=128),))  # the quickstart's budget: damage must show there too
    dense, tok = load_model(ZOO)
    before = evaluate(dense, tok, spec)
    pruned, _ = load_model(ZOO)
    prune_model(pruned, get_method("random")(), Target(sparsity=0.5))
    after = evaluate(pruned, tok, spec)
    key = "embedded:test@256/128"
    assert after["ppl"][key]["ppl"] >= 1.3 * before["ppl"][key]["ppl"]
    assert after["mean_acc"] < before["mean_acc"]
    assert after["protocol"]["hash"] == before["protocol"]["hash"]


def test_own_perplexity_agrees_with_lm_eval_rolling_loglikelihood():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model(ZOO)
    text = "\n".join(d.text for d in embedded_corpus().documents("test")[:4])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8, max_length=256)
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    theirs = math.exp(-ll / len(ids))
    ours = perplexity(model, torch.tensor(ids), 256, mode="rolling", prefix_token=lm.prefix_token_id)
    assert ours["tokens"] == len(ids)
    assert abs(ours["ppl"] / theirs - 1) < 0.01
    chunks = perplexity(model, torch.tensor(ids), 256)  # the paper convention: window starts are context only
    assert chunks["tokens"] == len(ids) // 256 * 255


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def half_sparsity():
    """Test perplexity of zoo:tiny-llama pruned to 50% by a method with a seed (and its metrics), and what random
    (median over SEEDS) and magnitude (deterministic) reach, on the quickstart's calibration."""
    _, tok = load_model(ZOO)
    calibration = CalibrationSpec(n=64, seq_len=128, valid_n=8).build(tok)
    stream = token_stream(embedded_corpus(), "test", tok)

    def ppl_after(method: str, overrides: dict, seed: int = 0) -> tuple[float, dict]:
        model, _ = load_model(ZOO)
        cfg = get_method(method).Config(**overrides)
        out = prune_model(model, get_method(method)(cfg), Target(sparsity=0.5), seed=seed,
                          calibration=calibration)
        assert abs(out.metrics["sparsity"] - 0.5) < 0.01
        return perplexity(model, stream, 256, windows=128)["ppl"], out.metrics

    random = statistics.median(ppl_after("random", {}, seed)[0] for seed in SEEDS)
    return ppl_after, {"random": random, "magnitude": ppl_after("magnitude", {})[0]}


QUICKSTART_BUDGET = {"steps": 120, "batch_size": 8}


@pytest.mark.parametrize("method, overrides", [
    ("ddp", QUICKSTART_BUDGET),
    ("ddp", QUICKSTART_BUDGET | {"preset": "budget-safe"}),
    ("hard_concrete", QUICKSTART_BUDGET),
    ("maskprune", QUICKSTART_BUDGET),
    ("tyr", {"generations": 2, "offspring": 4, "stage_tokens": [256, 1024], "stage_keep": [2, 1]}),
])
def test_mask_learners_and_tyr_beat_random_and_magnitude_at_half_sparsity(half_sparsity, method, overrides):
    """On zoo:tiny-llama at 50%, at the quickstart's budget (120 steps for the mask learners, published defaults),
    every mask learner, like Týr on a small search, beats random and magnitude on test perplexity; hard-concrete and
    DDP's `budget-safe` preset reach their budget by relaxation (within 2 points, before the final projection), which
    is that preset's claim. The published DDP overshoots at this step count (relaxed 0.56-0.57 over seeds 0-2, rows
    the report marks †): the honest result, not asserted away. Each is the median over three seeds: a 120-step run
    is one draw (MaskPrune's perplexity has spanned 52 to 143 over seeds 0-2)."""
    ppl_after, floor = half_sparsity
    runs = [ppl_after(method, overrides, seed) for seed in SEEDS]
    ppl = statistics.median(p for p, _ in runs)
    assert ppl < floor["random"] and ppl < floor["magnitude"], ([p for p, _ in runs], floor)
    if method == "hard_concrete" or "preset" in overrides:
        relaxed = [m["diag_relaxed_sparsity"] for _, m in runs]
        assert abs(statistics.median(relaxed) - 0.5) <= 0.02, relaxed
