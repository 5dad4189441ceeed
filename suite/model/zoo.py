"""What the embedded zoo holds and where: three tiny reference LMs (and the tokenizer they share), each fully
determined by its `ZooSpec`; `suite.zoo` trains them.

Pruning comparisons on random weights are noise, and this machine cannot download a model, so the project
trains and commits its own: a Llama-style MHA model, a Qwen3-style GQA model with q/k-norm, and a Qwen3-MoE
model. `prunebench zoo train NAME` reproduces any of them (resumable; bf16 autocast on CPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import ModelLoadError
from suite.registry import Registry

ZOO_ROOT = Path(__file__).parent.parent / "zoo_models"
TOKENIZER_DIR = ZOO_ROOT / "tokenizer"
VOCAB = 4096
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class ZooSpec:
    """What fully determines a zoo model: family, config, and the training recipe."""

    family: str
    config: dict[str, Any]
    tokens: int = 10_485_760  # >= 10M training tokens
    batch: int = 16
    seq_len: int = 256
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_seq_len: int = 256
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch * self.seq_len))


_BASE = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, head_dim=32,
             max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, initializer_range=0.02)
ZOO: Registry[ZooSpec] = Registry("zoo model")
for _name, _spec in {
    "tiny-llama": ZooSpec("llama", _BASE | dict(num_key_value_heads=8, intermediate_size=688),
                          notes="Llama, MHA: 8 heads x 32, 4 layers, MLP 688"),
    "tiny-qwen3": ZooSpec("qwen3", _BASE | dict(num_key_value_heads=4, intermediate_size=688),
                          notes="Qwen3, GQA 8 query / 4 KV heads, q/k-norm, 4 layers, MLP 688"),
    "tiny-qwen3-moe": ZooSpec("qwen3_moe", _BASE | dict(num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                                        moe_intermediate_size=192, intermediate_size=688,
                                                        norm_topk_prob=True, router_aux_loss_coef=0.01),
                              notes="Qwen3-MoE, GQA 8/4, 8 experts x 192 channels, top-2, 4 layers"),
}.items():
    ZOO.add(_name, _spec)


def spec(name: str) -> ZooSpec:
    return ZOO[name]


def model_dir(name: str) -> Path:
    spec(name)
    return ZOO_ROOT / name


def record(name: str) -> dict[str, Any] | None:
    path = model_dir(name) / "record.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resolve(model_spec: str) -> Path:
    """`zoo:NAME` -> the committed checkpoint directory (refused clearly when it has not been trained), or, for a real
    model fetched through pip (`suite.model.real`), its cached folder."""
    from suite.model import real

    name = model_spec.removeprefix("zoo:")
    if name in real.REAL:
        return real.resolve(name)
    d = model_dir(name)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"zoo model {name!r} has no checkpoint; run `prunebench zoo train {name}`")
    return d
