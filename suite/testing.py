"""Fakes that ship with the package (as optuna ships optuna.testing): tiny random models of every family.

Weights are drawn with a larger init range than HF's default so that logits differ across tokens and a wrong
slice or a forgotten scale shows up as a large error rather than noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from suite.model.families import FAMILIES

FAMILY_NAMES = tuple(FAMILIES)  # every registered family: each needs a tiny config below
VOCAB = 128


def tiny_config(family: str, **overrides: Any):
    """A tiny config: 3 layers, hidden 64, head_dim 8; MHA 8 heads for Llama, GQA 8 query / 4 KV heads otherwise."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        intermediate_size=48,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    per_family: dict[str, dict[str, Any]] = {
        "llama": dict(num_key_value_heads=8),
        "mistral": dict(sliding_window=None),
        "qwen2": dict(),
        "qwen3": dict(tie_word_embeddings=True),
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1],
                          decoder_sparse_step=1),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    }
    if family not in per_family:
        raise KeyError(f"family {family!r} is registered but has no tiny config in suite.testing.tiny_config")
    return AutoConfig.for_model(family, **(common | per_family[family] | overrides))


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random causal LM of `family`, in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def tiny_calibration(n: int = 4, seq_len: int = 16, seed: int = 0):
    """Random-token calibration batches for tiny random models (real text comes from suite.data.sources)."""
    from suite.data.calibration import Calibration

    ids = torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return Calibration.from_ids(ids, spec=f"random-tokens:n={n},seq_len={seq_len},seed={seed}")


def quick_config(method_cls):
    """A method's config at its test scale (`Pruner.quick`: few steps and small batches for tiny models)."""
    return method_cls.Config(**method_cls.quick)


def tiny_text_model(directory, family: str = "llama", seed: int = 0):
    """A tiny random model with the zoo tokenizer's vocabulary, saved with that tokenizer (for pipeline tests)."""
    from suite.model.zoo import VOCAB as ZOO_VOCAB
    from suite.zoo import tokenizer

    model = tiny_model(family, seed=seed, vocab_size=ZOO_VOCAB, hidden_size=32, head_dim=8,
                       num_attention_heads=4, num_key_value_heads=4 if family == "llama" else 2)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def tiny_experiment(directory, model, **settings: Any):
    """`directory`/exp.yaml: an experiment on `model` with a seconds-scale protocol (8 x 32 calibration sequences,
    a 128-token perplexity window, 12 items of one embedded task); `settings` replace top-level keys."""
    from pathlib import Path

    import yaml

    config = {
        "name": "unit",
        "models": [str(model)],
        "methods": [{"name": "random"}, {"name": "ddp", "params": {"steps": 4, "batch_size": 2, "valid_batches": 1}}],
        "sparsities": [0.3],
        "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
        "evaluation": {"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 12},
    } | settings
    path = Path(directory) / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
