"""`magnitude`: data-free weight-norm importance (FLAP's `mag_sp` reference point)."""

from __future__ import annotations

from torch import Tensor, nn

from suite.pruner import ScorePruner, register
from suite.structures import Structure, unit_sum


@register("magnitude")
class MagnitudePruner(ScorePruner):
    """Score of a unit = squared L2 norm of all the weights it owns (per parameter under `normalize: per_param`)."""

    def scores(self, model: nn.Module, structure: Structure, calibration: object, *, seed: int) -> dict[str, Tensor]:
        return {g.name: unit_sum(model, g, lambda p: p.detach().float() ** 2) for g in structure.groups}
