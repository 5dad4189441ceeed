"""Per-unit multiplicative gates on a live model, installed and removed without copying a weight.

A gate scales a unit's contribution where it enters its consumer: each attention head's output before o_proj,
each MLP channel before down_proj, each expert channel before that expert's down projection. Gates are read at
call time, so a mask-learning method assigns a fresh differentiable tensor each step (`gates.set(...)`), and a
one-shot method installs fixed 0/1 (or scaled) values from Masks. Compaction folds the same values into the
consumer weights, which is why `compact(gated) == gated` holds exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from suite.model.families import family_of
from suite.model.masks import Masks
from suite.model.modules import GatedExperts
from suite.model.structures import Group, Structure


class Gates:
    """Gates on every group of a structure; a group whose gate is None passes through unchanged."""

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        self.model = model
        self.structure = structure
        self.values: dict[str, Tensor | None] = {g.name: None for g in structure.groups}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._swapped: list[tuple[nn.Module, nn.Module]] = []  # (moe block, original experts)
        family = family_of(model)
        layers = family.layers(model)
        for group in structure.groups:
            if group.kind != "expert":  # a gate scales the consumer's input columns of each unit
                hook = self._attention_hook(group) if group.kind == "attn" else self._channel_hook(group.name)
                self._handles.append(family.consumer(layers[group.layer], group.kind).register_forward_pre_hook(hook))
        for i in sorted({g.layer for g in structure.groups if g.kind == "expert"}):
            block = family.moe(layers[i])
            names = {g.expert: g.name for g in structure.layer_groups(i) if g.kind == "expert"}
            self._swapped.append((block, block.experts))
            block.experts = GatedExperts(block.experts, lambda e, names=names: self.values[names[e]])

    def _attention_hook(self, group: Group):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            gate = self.values[group.name]
            if gate is None:
                return None
            (x,) = args  # [..., n_heads * head_dim]
            per_head = gate.repeat_interleave(group.heads_per_unit).to(x)  # [n_heads]
            return ((x.unflatten(-1, (-1, group.head_dim)) * per_head[:, None]).flatten(-2),)

        return hook

    def _channel_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            gate = self.values[name]
            return None if gate is None else (args[0] * gate.to(args[0]),)

        return hook

    def set(self, name: str, value: Tensor | None) -> None:
        """Gate one group: value [n_units] (differentiable or not), or None to pass through."""
        self.values[name] = value

    def set_all(self, values: Mapping[str, Tensor | None]) -> None:
        for name, value in values.items():
            self.set(name, value)

    def apply_masks(self, masks: Masks) -> None:
        """Hard gates from masks: 0 for removed units, 1 (or the unit's scale) for kept ones."""
        masks.check(self.structure)
        for name, keep in masks.keep.items():
            value = keep.float()
            if name in masks.scale:
                value = value * masks.scale[name].float()
            self.values[name] = value

    def remove(self) -> None:
        """Detach every hook and restore the original expert modules; the model is as before installation."""
        for handle in self._handles:
            handle.remove()
        for block, experts in self._swapped:
            block.experts = experts
        self._handles.clear()
        self._swapped.clear()

    def __enter__(self) -> Gates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
