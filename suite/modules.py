"""Modules the project owns, for shapes that stock transformers modules cannot express.

MoE experts: transformers stores a layer's experts as fused 3-D tensors (`gate_up_proj: [E, 2I, H]`,
`down_proj: [E, H, I]`) and dispatches through kernels that no hook can reach inside, so per-expert channel
gates need a module of our own (`GatedExperts`), and experts that keep different widths cannot live in one 3-D
tensor (`RaggedExperts`).
Both share one routing loop with the same call signature as the HF modules: `(hidden, top_k_index, top_k_weights)`.

Attention: HF's `repeat_kv` lets every K/V head serve the same number of query heads. After query-head pruning
that leaves different counts per KV group, `RepeatedHeadsLinear` replays K/V heads so the layer stays exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


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


def unwrap(experts: nn.Module) -> nn.Module:
    """The experts module holding the weights (through a GatedExperts installed by gates or capture)."""
    return experts.inner if isinstance(experts, GatedExperts) else experts


def expert_weights(experts: nn.Module, e: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views (gate [I, H], up [I, H], down [H, I]) of expert e, for HF fused experts or RaggedExperts."""
    experts = unwrap(experts)
    if isinstance(experts, RaggedExperts):
        mlp = experts[e]
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    width = experts.gate_up_proj.shape[1] // 2  # HF: rows [0:I] feed the activation, [I:2I] are "up"
    return experts.gate_up_proj[e, :width], experts.gate_up_proj[e, width:], experts.down_proj[e]


def expert_widths(experts: nn.Module) -> list[int]:
    """Intermediate width of every expert."""
    if isinstance(experts, RaggedExperts):
        return [mlp.down_proj.in_features for mlp in experts]
    return [experts.down_proj.shape[2]] * experts.down_proj.shape[0]


def is_experts(module: nn.Module) -> bool:
    """True for the HF fused experts layout and for ours."""
    return isinstance(module, RaggedExperts | GatedExperts) or (
        isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and module.gate_up_proj.dim() == 3
    )


def _expert_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, act: Callable, channel_gate: Tensor | None,
                observe: Callable[[Tensor], None] | None = None):
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
        return route(
            hidden_states,
            top_k_index,
            top_k_weights,
            lambda e, x: _expert_mlp(x, *expert_weights(self, e), self.act_fn, None),
        )


class GatedExperts(nn.Module):
    """Wraps an experts module (fused or ragged) and multiplies each expert's intermediate activation by a gate.

    Holds the wrapped module itself, so no weight is copied; `channel_gate(e)` returns expert e's gate or None.
    `observe(e, h)`, if given, sees expert e's intermediate activation (the down projection's input) ungated.
    """

    def __init__(self, inner: nn.Module, channel_gate: Callable[[int], Tensor | None],
                 observe: Callable[[int, Tensor], None] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.channel_gate = channel_gate
        self.observe = observe

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return route(
            hidden_states,
            top_k_index,
            top_k_weights,
            lambda e, x: _expert_mlp(x, *expert_weights(self.inner, e), self.inner.act_fn, self.channel_gate(e),
                                     None if self.observe is None else lambda h: self.observe(e, h)),
        )


class RepeatedHeadsLinear(nn.Linear):
    """A k_proj/v_proj that stores each kept K/V head once and emits head `head_index[s]` in output slot s.

    The attention module then sees `len(head_index)` K/V heads, each serving `num_key_value_groups` query heads,
    which is exact for any number of kept query heads per original KV group. Parameters are not duplicated, so
    parameter counts stay exact; only the activations (and the KV cache) carry the repeats.
    """

    def __init__(self, in_features: int, n_heads: int, head_dim: int, head_index: list[int], bias: bool) -> None:
        super().__init__(in_features, n_heads * head_dim, bias=bias)
        self.head_dim = head_dim
        self.register_buffer("head_index", torch.tensor(head_index, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x).unflatten(-1, (-1, self.head_dim))  # [..., n_heads, head_dim]
        return y.index_select(-2, self.head_index).flatten(-2)  # [..., n_slots * head_dim]
