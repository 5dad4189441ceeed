"""`slimgpt`: group-OBS selection + exact least-squares refit of the kept columns (SlimGPT, Ling et al.,
NeurIPS 2024)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.methods import (
    Group,
    InputStats,
    LayerwiseConfig,
    LayerwisePruner,
    closest_count,
    consumer_weight,
    refit_alive,
    register,
    removal_path,
)


class SlimGPTConfig(LayerwiseConfig):
    damp: float = Field(0.01, ge=0, description="H += damp * mean(diag H) * I (SlimGPT's percdamp)")
    rounds: int = Field(16, ge=1, description="greedy OBS rounds for channels (heads: one unit per round)")
    refit: bool = Field(True, description="exact least-squares refit of the kept columns after selection")

    budget: ClassVar[frozenset[str]] = LayerwiseConfig.budget | {"rounds"}


@register("slimgpt")
class SlimGPT(LayerwisePruner):
    """SlimGPT-style group OBS selection and exact least-squares refit, layer by layer on the pruned prefix.

    Per consumer: H = X^T X (damped); units removed greedily by OBS cost with the OBS weight update and the
    inverse-Hessian downdate between rounds (heads one at a time, channels in `rounds` batches); the survivors are
    then refit exactly. Layers in order, each measured on the pruned prefix. GQA: a unit is a whole KV group."""

    Config = SlimGPTConfig
    gram = True

    def prune_group(self, model: nn.Module, group: Group, stats: InputStats, goal: int) -> Tensor:
        cfg = self.config
        weight = consumer_weight(model, group)
        h = stats.hessian(cfg.damp)
        b0 = weight.detach().to(h).T.clone()  # [C, out]
        if group.kv_params:  # shared K/V heads: one head at a time, the count whose removal comes closest to goal
            path = removal_path(h, b0, group, list(range(group.n_units)), cfg.rounds)
            count = closest_count(goal, path, lambda c: group.removed_params(path[c].alive))
        else:
            count = goal // group.unit_params
            path = removal_path(h, b0, group, [count], cfg.rounds)
        alive = path[count].alive
        b = refit_alive(h, b0, group, alive) if cfg.refit else path[count].weight
        with torch.no_grad():
            weight.copy_(b.T.to(weight))
        return alive
