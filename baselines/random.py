"""`random`: the floor every method must beat. Scores are i.i.d. uniform, drawn from the run's seed."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from suite.methods import ScorePruner, Structure, register


@register("random")
class RandomPruner(ScorePruner):
    """Removes random units; with the default per-layer selection every group loses the same parameter share."""

    def scores(self, model: nn.Module, structure: Structure, calibration: object, *, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.rand(g.n_units, generator=gen, dtype=torch.float64) for g in structure.groups}
