"""Modeling code for pruned checkpoints whose layers have different shapes. Self-contained (torch and transformers
only): prunebench copies this file verbatim into every such checkpoint and registers it through `auto_map`, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

`pipeline(...)` and `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` load it with no
prunebench installed. prunebench itself imports the same classes from here (one definition of each shape).

The config (`Prunebench<Family>Config`) declares the per-layer widths: in config.json `num_attention_heads`,
`num_key_value_heads` and the MLP/expert width keys are lists with one entry per layer (per expert for MoE), and
`model_type` is `prunebench_<family>`. A stock config class therefore refuses the file (its validator wants ints),
so no `ignore_mismatched_sizes` path can build a dense skeleton and silently re-initialise the pruned weights. In
memory the config keeps the dense sizes (what the stock modules are first built with) and `prunebench_layout`
holds every layer's shapes; the model class (`Prunebench<Family>ForCausalLM`) rebuilds each layer at those shapes
before the weights load.

Shapes stock modules cannot express:
- experts of different widths (`RaggedExperts`: children 0..E-1, HF's per-expert parameter names);
- kept K/V heads that serve different numbers of query heads after query-head pruning (`RepeatedHeadsLinear`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import Tensor, nn

LAYOUT_KEY = "prunebench_layout"
MODEL_TYPE_PREFIX = "prunebench_"
# family -> (stock class prefix, dense MLP width key, expert width key)
FAMILY_KEYS: dict[str, tuple[str, str, str | None]] = {
    "llama": ("Llama", "intermediate_size", None),
    "mistral": ("Mistral", "intermediate_size", None),
    "qwen2": ("Qwen2", "intermediate_size", None),
    "qwen3": ("Qwen3", "intermediate_size", None),
    "qwen3_moe": ("Qwen3Moe", "intermediate_size", "moe_intermediate_size"),
    "mixtral": ("Mixtral", "intermediate_size", "intermediate_size"),
}
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads")


def route(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, expert_fn: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Send each token to its top-k experts and sum their weighted outputs.

    hidden: [T, H]; top_k_index, top_k_weights: [T, k]; expert_fn(e, x [n, H]) -> [n, H].
    """
    out = torch.zeros_like(hidden)
    for e in torch.unique(top_k_index).tolist():
        token_idx, pos = torch.where(top_k_index == e)
        y = expert_fn(e, hidden[token_idx]) * top_k_weights[token_idx, pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def expert_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, act: Callable, channel_gate: Tensor | None = None,
               observe: Callable[[Tensor], None] | None = None) -> Tensor:
    """One SwiGLU expert on x [n, H]; `channel_gate` scales its intermediate channels, `observe` sees them ungated."""
    h = act(nn.functional.linear(x, gate)) * nn.functional.linear(x, up)  # [n, I]
    if observe is not None:
        observe(h)
    if channel_gate is not None:
        h = h * channel_gate.to(h)
    return nn.functional.linear(h, down)


class ExpertMLP(nn.Module):
    """One expert with its own width; parameter names match HF's per-expert checkpoint keys."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)


class RaggedExperts(nn.Module):
    """Experts whose intermediate widths differ, after per-expert channel pruning (children named 0..E-1)."""

    def __init__(self, hidden: int, widths: list[int], act_fn: Callable) -> None:
        super().__init__()
        for e, w in enumerate(widths):
            self.add_module(str(e), ExpertMLP(hidden, w))
        self.act_fn = act_fn
        self.num_experts = len(widths)

    def __getitem__(self, e: int) -> ExpertMLP:
        return getattr(self, str(e))

    def __iter__(self):
        return (self[e] for e in range(self.num_experts))

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        def one(e: int, x: Tensor) -> Tensor:  # through the modules, so a wrapper (a LoRA layer) takes part
            m = self[e]
            return m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))

        return route(hidden_states, top_k_index, top_k_weights, one)


class RepeatedHeadsLinear(nn.Linear):
    """A k_proj/v_proj that stores each kept K/V head once and emits head `head_index[s]` in output slot s.

    The attention module then sees `len(head_index)` K/V heads, each serving `num_key_value_groups` query heads,
    which is exact for any number of kept query heads per original KV group. Parameters are not duplicated, so
    parameter counts stay exact; only the activations (and the KV cache) carry the repeats. The slot map is a plain
    list, not a buffer: HF builds remote-code models on the meta device, where a non-persistent buffer's values are
    lost.
    """

    def __init__(self, in_features: int, n_heads: int, head_dim: int, head_index: list[int], bias: bool) -> None:
        super().__init__(in_features, n_heads * head_dim, bias=bias)
        self.head_dim = head_dim
        self.head_index = list(head_index)

    def forward(self, x: Tensor) -> Tensor:
        return self.replay(super().forward(x))

    def replay(self, y: Tensor) -> Tensor:
        """The stored heads' outputs [..., n_heads * head_dim] -> one per output slot [..., n_slots * head_dim]."""
        y = y.unflatten(-1, (-1, self.head_dim))
        index = torch.tensor(self.head_index, dtype=torch.long, device=y.device)
        return y.index_select(-2, index).flatten(-2)


def linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (no allocation of its own)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def kv_linear(weight: Tensor, bias: Tensor | None, head_dim: int, kv_index: list[int] | None) -> nn.Linear:
    if kv_index is None:
        return linear(weight, bias)
    lin = RepeatedHeadsLinear(weight.shape[1], weight.shape[0] // head_dim, head_dim, kv_index, bias is not None)
    lin.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if weight.device.type != "meta":
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


def install_attention(attn: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, groups: int) -> None:
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = q, k, v, o
    attn.num_key_value_groups = groups  # the only per-layer head count HF's attention reads at run time


def ragged_experts(act_fn: Callable, weights: list[tuple[Tensor, Tensor, Tensor]]) -> RaggedExperts:
    """RaggedExperts holding per expert these (gate [w, H], up [w, H], down [H, w]) tensors."""
    ragged = RaggedExperts(weights[0][2].shape[0], [g.shape[0] for g, _, _ in weights], act_fn)
    for mlp, (gate, up, down) in zip(ragged, weights, strict=True):
        mlp.gate_proj.weight = nn.Parameter(gate.contiguous(), requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(up.contiguous(), requires_grad=False)
        mlp.down_proj.weight = nn.Parameter(down.contiguous(), requires_grad=False)
    return ragged


def _empty(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def reshape(layers: nn.ModuleList, specs: list[dict[str, Any]]) -> None:
    """Rebuild every decoder layer's modules at the shapes of a layout (uninitialised: the weights come next)."""
    for layer, spec in zip(layers, specs, strict=True):
        attn, hd = layer.self_attn, spec["head_dim"]
        like = attn.q_proj.weight
        hidden = attn.q_proj.in_features

        def proj(lin: nn.Linear, out: int, like: Tensor = like, hidden: int = hidden) -> tuple:
            return _empty(out, hidden, like=like), None if lin.bias is None else _empty(out, like=like)

        q_out, kv_out = spec["q_heads"] * hd, spec["kv_heads"] * hd
        per_slot = spec["q_heads"] // (len(spec["kv_index"]) if spec["kv_index"] else spec["kv_heads"])
        o_bias = _empty(hidden, like=like) if spec.get("o_bias", attn.o_proj.bias is not None) else None
        install_attention(
            attn,
            linear(*proj(attn.q_proj, q_out)),
            kv_linear(*proj(attn.k_proj, kv_out), hd, spec["kv_index"]),
            kv_linear(*proj(attn.v_proj, kv_out), hd, spec["kv_index"]),
            linear(_empty(hidden, q_out, like=like), o_bias),
            per_slot,
        )
        mlp = layer.mlp
        if "intermediate" in spec:
            w = spec["intermediate"]
            mlp.gate_proj = linear(*proj(mlp.gate_proj, w))
            mlp.up_proj = linear(*proj(mlp.up_proj, w))
            down_bias = _empty(hidden, like=like) if spec.get("down_bias", mlp.down_proj.bias is not None) else None
            mlp.down_proj = linear(_empty(hidden, w, like=like), down_bias)
        if spec.get("experts_fused"):
            experts, (w, *_) = mlp.experts, spec["experts"]
            experts.gate_up_proj = nn.Parameter(_empty(len(spec["experts"]), 2 * w, hidden, like=like))
            experts.down_proj = nn.Parameter(_empty(len(spec["experts"]), hidden, w, like=like))
            experts.intermediate_dim = w
        elif "experts" in spec:
            shapes = [(_empty(w, hidden, like=like), _empty(w, hidden, like=like), _empty(hidden, w, like=like))
                      for w in spec["experts"]]
            mlp.experts = ragged_experts(mlp.experts.act_fn, shapes)


def per_layer_widths(family: str, layout: dict[str, Any]) -> dict[str, list[Any]]:
    """What config.json declares for a layout: head counts and MLP/expert widths, one entry per layer."""
    _, dense_key, expert_key = FAMILY_KEYS[family]
    layers = layout["layers"]
    out: dict[str, list[Any]] = {"num_attention_heads": [s["q_heads"] for s in layers],
                                 "num_key_value_heads": [s["kv_heads"] for s in layers]}
    if any("intermediate" in s for s in layers):
        out[dense_key] = [s.get("intermediate") for s in layers]
    if expert_key is not None and any("experts" in s for s in layers):
        dense = out.get(expert_key, [None] * len(layers))  # Mixtral: one key for both
        out[expert_key] = [s["experts"] if "experts" in s else dense[i] for i, s in enumerate(layers)]
    return out


class PrunedConfigMixin:
    """A family config whose config.json declares per-layer widths (see the module docstring)."""

    family: str

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        layout = out.get(LAYOUT_KEY)
        if layout and "dense" in layout:
            out |= per_layer_widths(self.family, layout)
            prefix = f"Prunebench{FAMILY_KEYS[self.family][0]}"
            out["auto_map"] = {"AutoConfig": f"modeling_prunebench.{prefix}Config",
                               "AutoModelForCausalLM": f"modeling_prunebench.{prefix}ForCausalLM"}
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        layout = config_dict.get(LAYOUT_KEY)
        if layout and "dense" in layout:  # the lists are a declaration; the stock modules start from dense sizes
            config_dict = config_dict | layout["dense"]
        return super().from_dict(config_dict, **kwargs)


class PrunedModelMixin:
    """A family's causal LM whose layers are rebuilt at the shapes of `config.prunebench_layout` on construction."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        reshape(self.model.layers, config.prunebench_layout["layers"])


def _pruned_classes(family: str) -> tuple[type, type]:
    stock = FAMILY_KEYS[family][0]
    base_config = getattr(transformers, f"{stock}Config")
    base_model = getattr(transformers, f"{stock}ForCausalLM")
    config = type(f"Prunebench{stock}Config", (PrunedConfigMixin, base_config),
                  {"model_type": MODEL_TYPE_PREFIX + family, "family": family, "__module__": __name__})
    model = type(f"Prunebench{stock}ForCausalLM", (PrunedModelMixin, base_model),
                 {"config_class": config, "__module__": __name__})
    return config, model


PRUNED_CLASSES: dict[str, tuple[type, type]] = {family: _pruned_classes(family) for family in FAMILY_KEYS}
for _config, _model in PRUNED_CLASSES.values():  # module attributes, as auto_map names them
    globals()[_config.__name__] = _config
    globals()[_model.__name__] = _model
