"""Modules the project owns, for shapes that stock transformers modules cannot express.

MoE experts: transformers stores a layer's experts as fused 3-D tensors (`gate_up_proj: [E, 2I, H]`,
`down_proj: [E, H, I]`) and dispatches through kernels that no hook can reach inside, so per-expert channel
gates need a module of our own (`GatedExperts`), and experts that keep different widths cannot live in one 3-D
tensor (`RaggedExperts`).
Both share one routing loop with the same call signature as the HF modules: `(hidden, top_k_index, top_k_weights)`.

Attention: HF's `repeat_kv` lets every K/V head serve the same number of query heads. After query-head pruning
that leaves different counts per KV group, `RepeatedHeadsLinear` replays K/V heads so the layer stays exact.

The modules a compact model keeps (RaggedExperts, RepeatedHeadsLinear) are defined in `modeling_prunebench`, the
file shipped inside pruned checkpoints; this module adds what only pruning needs (gates, weight views).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from suite.model.modeling_prunebench import ExpertMLP, RaggedExperts, RepeatedHeadsLinear, expert_mlp, route

__all__ = ["ExpertMLP", "GatedExperts", "RaggedExperts", "RepeatedHeadsLinear", "expert_weights", "expert_widths",
           "is_experts", "model_device", "on_device", "route", "to_device", "unwrap"]


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
            lambda e, x: expert_mlp(x, *expert_weights(self.inner, e), self.inner.act_fn, self.channel_gate(e),
                                     None if self.observe is None else lambda h: self.observe(e, h)),
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) for the block, its train/eval mode put back after it, error or not."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter (a dispatched model's first block)."""
    return next(model.parameters()).device


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (through tuples, lists and dicts) moved to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`module` moved to `device` for the block and back where it was after it (nothing moves when it is there
    already): how a layer-wise method holds one decoder layer at a time on the compute device. Changes made to the
    module's weights inside the block travel back with it."""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
