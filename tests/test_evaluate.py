"""Evaluation internals on tiny random models: shared-context scoring equals lm-eval's, perplexity window budgets."""

from __future__ import annotations

import random

import pytest
import torch

from suite.errors import ConfigError
from suite.evaluation.evaluate import PplSpec, perplexity
from suite.testing import tiny_model
from suite.zoo import VOCAB, tokenizer


def _requests(seed: int = 0):
    """Multiple-choice style requests: shared contexts with 1-5 candidates, a one-token context, a too-long one."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "while", "yield", "lambda",
             "value", "items", "x", "y"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    pairs = [(ctx, " " + text(rng.randint(1, 6))) for ctx in (text(rng.randint(3, 30)) for _ in range(9))
             for _ in range(rng.randint(1, 5))]
    pairs += [("x", " y"), ("x", " return self"), ("self", " items"), (text(200), " value")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_shared_context_scoring_matches_stock_lm_eval(family):
    from lm_eval.models.huggingface import HFLM

    from suite.evaluation.harness import SharedContextLM

    model = tiny_model(family, vocab_size=VOCAB, max_position_embeddings=64)
    tok = tokenizer()
    requests = _requests()
    kwargs = {"pretrained": model, "tokenizer": tok, "device": "cpu", "batch_size": 4, "max_length": 64}
    ours = SharedContextLM(**kwargs).loglikelihood(requests, disable_tqdm=True)
    stock = HFLM(**kwargs).loglikelihood(requests, disable_tqdm=True)
    assert len(ours) == len(stock) == len(requests)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, stock, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_perplexity_window_budget_spreads_windows_over_the_stream():
    model = tiny_model("llama", vocab_size=VOCAB)
    stream = torch.randint(0, VOCAB, (40 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, stream, 16)
    assert perplexity(model, stream, 16, windows=1000)["ppl"] == pytest.approx(full["ppl"])
    part = perplexity(model, stream, 16, windows=5)
    assert part["tokens"] == 5 * 15
    picked = torch.cat([stream[i * 16 : (i + 1) * 16] for i in (0, 10, 20, 29, 39)])  # evenly over 40 windows
    assert part["ppl"] == pytest.approx(perplexity(model, picked, 16)["ppl"])
    with pytest.raises(ConfigError, match="chunks"):
        perplexity(model, stream, 16, mode="rolling", windows=5)


def test_ppl_spec_round_trips_and_rejects_malformed_text():
    spec = PplSpec.parse("embedded:test@256/128")
    assert (spec.source, spec.split, spec.seq_len, spec.windows) == ("embedded", "test", 256, 128)
    assert str(spec) == "embedded:test@256/128" and str(PplSpec.parse("wikitext2:test@128")) == "wikitext2:test@128"
    for bad in ("embedded:test@x", "embedded:test@256/0", "embedded:test@256/many", "embedded@1"):
        with pytest.raises(ConfigError, match="SOURCE"):
            PplSpec.parse(bad)
