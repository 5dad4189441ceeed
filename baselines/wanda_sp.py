"""`wanda_sp`: structured Wanda (Sun et al., arXiv 2306.11695, in the form of FLAP's `prune_wanda_sp`) — local,
no reconstruction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from suite.methods import Group, InputStats, LayerwisePruner, closest_removal, consumer_weight, register, unit_columns


@register("wanda_sp")
class WandaSP(LayerwisePruner):
    """Structured Wanda: weight magnitude times input norm per consumer column, per-layer ratio, no refit.

    Column score mean_i |W_ij| * ||X_j||_2 on the consumer (o_proj / down_proj / expert down), summed over a unit's
    columns; per-layer uniform ratio; layers decided in order on the pruned prefix."""

    def prune_group(self, model: nn.Module, group: Group, stats: InputStats, goal: int) -> Tensor:
        w = consumer_weight(model, group).detach().double().cpu()
        score = (w.abs().mean(0) * stats.norm)[unit_columns(group)].sum(1)
        return closest_removal(group, torch.sort(score, stable=True).indices, goal)
