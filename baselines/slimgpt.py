"""`slimgpt`: group-OBS selection + exact least-squares refit of the kept columns (METHODS.md B4c/B4d)."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.capture import InputStats, consumer_weight, unit_columns
from suite.layerwise import LayerwiseConfig, LayerwisePruner
from suite.pruner import register
from suite.structures import Group


class SlimGPTConfig(LayerwiseConfig):
    damp: float = Field(0.01, ge=0, description="H += damp * mean(diag H) * I (SlimGPT's percdamp)")
    rounds: int = Field(16, ge=1, description="greedy OBS rounds for channels (heads: one unit per round)")
    refit: bool = Field(True, description="exact least-squares refit of the kept columns after selection")


def obs_costs(b: Tensor, hinv: Tensor, cols: Tensor) -> Tensor:
    """Per unit: 1/2 tr(B_g^T ([H^-1]_gg)^-1 B_g), the output error its removal causes after the OBS update."""
    bg = b[cols]  # [n, g, out]
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [n, g, g]
    return 0.5 * (bg * torch.linalg.solve(blocks, bg)).sum((1, 2))


def refit(h: Tensor, b: Tensor, kept: Tensor) -> Tensor:
    """argmin_B' ||X B' - X B|| with B' zero outside the kept rows: B'_K = (H_KK)^-1 (H B)_K."""
    out = torch.zeros_like(b)
    out[kept] = torch.linalg.solve(h[kept][:, kept], (h @ b)[kept])
    return out


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
        b = b0.clone()
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        cols = unit_columns(group).to(h.device)
        alive = torch.ones(group.n_units, dtype=torch.bool)
        shared_kv = bool(group.kv_params)
        remove = group.n_units - 1 if shared_kv else goal // group.unit_params
        rounds = remove if group.kind == "attn" else min(cfg.rounds, remove)
        for r in range(rounds):
            k = math.ceil((remove - int((~alive).sum())) / (rounds - r))
            cost = obs_costs(b, hinv, cols).masked_fill(~alive.to(h.device), math.inf)
            units = torch.sort(cost, stable=True).indices[:k].cpu()
            if shared_kv:  # one head at a time, while that brings the removed parameters closer to the goal
                trial = alive.clone()
                trial[units] = False
                if abs(group.removed_params(trial) - goal) >= abs(group.removed_params(alive) - goal):
                    break
            s = cols[units.to(h.device)].flatten()
            hss = hinv[s][:, s]
            b -= hinv[:, s] @ torch.linalg.solve(hss, b[s])
            b[s] = 0
            hinv -= hinv[:, s] @ torch.linalg.solve(hss, hinv[s, :])
            hinv[s, :] = 0
            hinv[:, s] = 0
            hinv[s, s] = 1  # removed columns drop out of every later block solve
            alive[units] = False
        if cfg.refit:
            b = refit(h, b0, cols[alive.to(h.device)].flatten())
        with torch.no_grad():
            weight.copy_(b.T.to(weight))
        return alive
