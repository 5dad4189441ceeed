"""`maskprune`: uniform-width mask learning (Qin et al., arXiv 2502.14008; docs/methods.md), on the shared engine.

The reconstruction of the paper's minimax problem

    min_{m, s} max_{y, z >= 0}  L(m) + sum_{l,t} y_{l,t} (||m_{l,t}||_0 - s_t) + z (R(s) - R_budget)

as implemented: every unit has a real-valued score, every unit kind t (attention, MLP, expert channels) one shared
width s_t = u_t n_t. Both constraints are handled by projections, the paper's proximal steps:
* the forward mask is the projection of the scores onto {||m_{l,t}||_0 <= s_t}: in every layer the top floor(s_t)
  units by score get 1, the next one the fractional part of s_t (so the loss has a gradient in s_t), the rest 0;
  gradients reach the scores straight through (STE). The per-layer constraint then holds exactly, its multipliers
  y stay at zero and are not materialised;
* after every gradient step the widths are projected onto the resource budget R(s) = R_t (Euclidean projection
  onto the hyperplane, clipped to [1 unit, all units]), R_t following the engine's target schedule. The loss
  gradient moves the widths off the budget, the projection moves them back: what is learned is how the budget is
  split between attention and MLP. The engine's Lagrangian (z) is kept and sees a gap of about zero.
Since s_t is one number per kind, every pruned layer ends with the same widths, and the final widths are chosen
among those a stock config of the family can declare (`suite.model.compact.stock_widths`: Llama's head count must divide
hidden_size, fused expert widths are multiples of 8), so the compact model loads with stock `from_pretrained`.

Differences from the paper, on purpose: weights stay frozen (no LoRA adapters; the engine's `train_weights` and
`kd_weight` are there for that experiment), so that the comparison with DDP and hard-concrete isolates the mask
parameterisation; the scores start equal (tiny seeded noise) and order themselves by accumulated gradient, so the
target ramps up over the first 30% of the steps by default.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.methods import (
    Group,
    MaskLearner,
    MaskLearningConfig,
    Masks,
    Relaxation,
    Structure,
    Target,
    register,
    select,
    sparsity_weights,
    stock_widths,
)


class MaskPruneConfig(MaskLearningConfig):
    target_warmup: float = Field(0.3, ge=0, le=1, description="fraction of steps to ramp the target from 0")
    width_travel: float = Field(6.0, gt=0, description="total Adam travel of a shared width over the run: the "
                                "default width_lr is width_travel / steps (0.02 at 300 steps)")
    width_lr: float | None = Field(None, gt=0, description="learning rate of the shared widths (Adam); default "
                                   "width_travel / steps")
    init_std: float = Field(1e-3, ge=0, description="std of the seeded noise that breaks ties between equal scores")


def ranks(scores: Tensor) -> Tensor:
    """Rank of each unit by descending score (0 = best); ties go to the lower index, so masks are deterministic."""
    order = torch.sort(-scores.detach(), stable=True).indices
    out = torch.empty_like(order)
    out[order] = torch.arange(len(order))
    return out


class MaskPruneRelaxation(Relaxation):
    config: MaskPruneConfig

    def __init__(self, config: MaskPruneConfig, structure, groups, seed: int,
                 widths: dict[str, list[int]] | None = None) -> None:
        super().__init__(config, structure, groups, seed)
        self.allowed = widths  # the kept widths a stock config can declare, per kind
        init = torch.Generator().manual_seed(seed)
        self.scores = {g.name: nn.Parameter(config.init_std * torch.randn(g.n_units, generator=init)) for g in groups}
        self.kinds = sorted({g.kind for g in groups})
        # one kept fraction per unit kind, shared by every pruned layer (and every expert)
        self.width = {k: nn.Parameter(torch.ones(())) for k in self.kinds}
        self._group = {g.name: g for g in groups}
        self._units = {k: min(g.n_units for g in groups if g.kind == k) for k in self.kinds}  # uniform: all equal
        weights, total = sparsity_weights(structure, groups, config.weighting)
        # d(expected sparsity) / d(u_t): the share of the total that kind t's units carry
        self._share = {k: float(sum(weights[g.name].sum() for g in groups if g.kind == k)) / total for k in self.kinds}

    def parameters(self) -> dict[str, nn.Parameter]:
        return self.scores | {f"width.{k}": w for k, w in self.width.items()}

    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        width_lr = cfg.width_lr if cfg.width_lr is not None else cfg.width_travel / cfg.steps
        return [{"params": list(self.scores.values())}, {"params": list(self.width.values()), "lr": width_lr}]

    def _kept(self, name: str) -> Tensor:
        """The shared width in units for this group (float: the fractional part is the boundary unit's gate)."""
        g = self._group[name]
        return self.width[g.kind] * g.n_units

    def train_gates(self, step: int) -> dict[str, Tensor]:
        gates = {}
        for name, s in self.scores.items():
            projected = (self._kept(name) - ranks(s)).clamp(0.0, 1.0)
            gates[name] = projected + (s - s.detach())  # straight-through: the value is the projection
        return gates

    def keep_probability(self, step: int) -> dict[str, Tensor]:
        return {n: self.width[g.kind].clamp(0.0, 1.0).expand(g.n_units) for n, g in self._group.items()}

    def discrete_keep(self) -> dict[str, Tensor]:
        return {n: ranks(s) < torch.round(self._kept(n).detach()) for n, s in self.scores.items()}

    def anneal(self, step: int) -> dict[str, float]:
        return {f"width.{k}": w.item() for k, w in self.width.items()}

    def after_step(self, gap: float) -> None:
        """Project the widths onto the budget: u <- clip(u - delta a) with sum_t a_t (u'_t - u_t) = gap, where
        a_t = d(expected sparsity)/d(u_t) (bisection on delta: the clip makes it piecewise linear)."""
        with torch.no_grad():
            u = {k: w.item() for k, w in self.width.items()}

            def moved(delta: float) -> dict[str, float]:
                return {k: min(1.0, max(1.0 / self._units[k], u[k] - delta * self._share[k])) for k in u}

            def change(delta: float) -> float:
                new = moved(delta)
                return sum(self._share[k] * (new[k] - u[k]) for k in u)

            lo, hi = -1e3, 1e3  # change() decreases in delta; the bracket spans every reachable width
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if change(mid) > gap else (lo, mid)
            for k, value in moved((lo + hi) / 2).items():
                self.width[k].fill_(value)

    def final(self, target: Target) -> tuple[Masks, dict[str, Any]]:
        # the learned widths decide (an indicator worth each unit's parameters, so that missing the budget is
        # corrected at an equal price per parameter in every kind), the learned order breaks ties; the shared
        # `uniform` selection then meets the budget with one width per kind
        hard = self.discrete_keep()
        scores = {}
        for g in self.structure.groups:
            if g.name in hard:
                r = ranks(self.scores[g.name]).double()
                scores[g.name] = (hard[g.name].double() + 1e-3 * (1.0 - r / g.n_units)) * g.unit_params
            else:
                scores[g.name] = torch.ones(g.n_units, dtype=torch.float64)
        masks = select(self.structure, scores, target, mode="uniform", normalize="raw", widths=self.allowed,
                       seed=self.seed)
        learned = {k: round(w.item() * self._units[k]) for k, w in self.width.items()}
        return masks, {**{f"learned_width.{k}": v for k, v in learned.items()},
                       **{f"final_width.{k}": self._final_width(masks, k) for k in self.kinds}}

    def _final_width(self, masks: Masks, kind: str) -> int:
        return next(int(masks.keep[n].sum()) for n, g in self._group.items() if g.kind == kind)


@register("maskprune")
class MaskPrune(MaskLearner):
    """MaskPrune: per-unit scores projected onto one learned width per unit kind (uniform layers, standard config)."""

    Config = MaskPruneConfig
    relaxation = MaskPruneRelaxation
    search_space: ClassVar[dict[str, dict[str, Any]]] = {  # the shared widths' travel, then the engine's knobs
        "width_travel": {"type": "float", "low": 1.0, "high": 30.0, "log": True},
        **MaskLearner.search_space,
    }

    def make_relaxation(self, model: nn.Module, structure: Structure, groups: list[Group],
                        seed: int) -> MaskPruneRelaxation:
        return MaskPruneRelaxation(self.config, structure, groups, seed, stock_widths(model.config, structure))
