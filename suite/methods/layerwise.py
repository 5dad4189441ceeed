"""The shared frame of layer-wise one-shot methods (Wanda-sp, SlimGPT; FLAP reuses its pieces).

Per-layer (or uniform) selection fixes how many parameters every group gives up before any score is known (it
depends on the structure and the target only), so each layer can be decided as soon as its calibration statistics
exist, its removed units zeroed (and its kept weights refit, for reconstruction methods), and the next layer
measured on the pruned prefix. The plan comes from the same `select` every score-based method uses, so targets,
`skip_layers`, `min_keep`, `round_to` and `uniform` mean the same thing here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.data.calibration import Calibration
from suite.methods.capture import InputStats, remove_units, walk
from suite.methods.pruner import MethodConfig, Pruner, PruneResult, calibration_ids
from suite.model.masks import Masks, Target, select
from suite.model.structures import Group, Structure


def removal_goals(structure: Structure, target: Target, mode: str) -> dict[str, int]:
    """Parameters each group gives up under per-layer or uniform selection (independent of scores)."""
    flat = {g.name: torch.zeros(g.n_units) for g in structure.groups}
    keep = select(structure, flat, target, mode=mode).keep
    return {g.name: g.removed_params(keep[g.name]) for g in structure.groups}


def closest_count(goal: float, counts: Iterable[int], removed: Callable[[int], int]) -> int:
    """The number of units to remove whose removed parameters, `removed(count)`, come closest to a parameter `goal`
    (the smaller count on a tie). Under `query_head` granularity a shared K/V head is freed only with its last query
    head, so what a count removes depends on which heads go: every local method asks this one question."""
    return min(counts, key=lambda c: (abs(removed(c) - goal), c))


def closest_removal(group: Group, order: Tensor, goal: int) -> Tensor:
    """Keep vector after removing the first m units of `order` (least important first), m the `closest_count`."""

    def keep_after(m: int) -> Tensor:
        keep = torch.ones(group.n_units, dtype=torch.bool)
        keep[order[:m]] = False
        return keep

    return keep_after(closest_count(goal, range(group.n_units), lambda m: group.removed_params(keep_after(m))))


class LayerwiseConfig(MethodConfig):
    selection: Literal["per_layer", "uniform"] = Field(
        "per_layer", description="same parameter fraction removed per group, or one width per kind everywhere")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward pass")

    budget: ClassVar[frozenset[str]] = frozenset({"batch_size"})


class LayerwisePruner(Pruner):
    """Walks the decoder once; `prune_group` chooses (and may refit) one group given its consumer's input stats."""

    Config: ClassVar[type[MethodConfig]] = LayerwiseConfig
    needs_calibration = True
    gram: ClassVar[bool] = False  # capture X^T X (reconstruction methods)
    offloads = True

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        ids = calibration_ids(self.name, calibration)
        goals = removal_goals(structure, target, self.config.selection)
        keep: dict[str, Tensor] = {}
        for layer, stats in walk(model, structure, ids, gram=self.gram, batch_size=self.config.batch_size,
                                 device=self.device):
            for g in structure.layer_groups(layer):
                if goals[g.name] == 0:
                    keep[g.name] = torch.ones(g.n_units, dtype=torch.bool)
                    continue
                keep[g.name] = self.prune_group(model, g, stats[g.name], goals[g.name])
                remove_units(model, g, keep[g.name])
        return PruneResult(Masks(keep, fingerprint=structure.fingerprint))

    @abstractmethod
    def prune_group(self, model: nn.Module, group: Group, stats: InputStats, goal: int) -> Tensor:
        """Keep vector [n_units] removing about `goal` parameters (`closest_removal`); may change the group's
        consumer weights in place."""
