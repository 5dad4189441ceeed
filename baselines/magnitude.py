"""`magnitude`: data-free weight-norm importance, two published variants.

* `block_l2` (default): LLM-Pruner's block-wise magnitude baseline (its `l2` pruner type): a unit's score is the
  squared L2 norm of every weight it owns, summed over the coupled layers: its q/k/v rows and o_proj columns for an
  attention unit, its gate/up rows and down column for an MLP or expert channel.
* `mag_sp`: FLAP's magnitude baseline: the L2 norm of the unit's consumer columns only (o_proj columns, summed over
  a head's head_dim columns; one down_proj column per channel), with FLAP's per-layer ratio as the usual choice
  (`selection: per_layer`, the default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from suite.methods import ScorePruner, SelectionConfig, Structure, consumer_weight, register, unit_columns, unit_sum


class MagnitudeConfig(SelectionConfig):
    score: Literal["block_l2", "mag_sp"] = Field(
        "block_l2", description="block_l2: squared L2 of all the unit's weights (LLM-Pruner); mag_sp: L2 of its "
        "consumer columns (FLAP)")


@register("magnitude")
class MagnitudePruner(ScorePruner):
    """Weight-norm scores: LLM-Pruner's block-wise squared L2 (default) or FLAP's consumer-column norm."""

    Config = MagnitudeConfig

    def scores(self, model: nn.Module, structure: Structure, calibration: object, *, seed: int) -> dict[str, Tensor]:
        if self.config.score == "mag_sp":
            return {g.name: consumer_weight(model, g).detach().float().norm(dim=0)[unit_columns(g)].sum(1)
                    for g in structure.groups}
        return {g.name: unit_sum(model, g, lambda p: p.detach().float() ** 2) for g in structure.groups}
