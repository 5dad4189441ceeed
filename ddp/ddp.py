"""DDP: one real gate z per unit, a deterministic forward mask m = relu(z), and a retention score
s = sigmoid(mu z) that feeds only the regulariser; mu is annealed so that sum(s) approaches the l0 count
(METHODS.md A2, B1). The final mask keeps z > 0 and tops up or trims by z to hit the budget exactly; the kept
gate values are folded into the consumer weights at compaction."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.masklearn import MaskLearner, MaskLearningConfig, Relaxation, effective_sparsity, rank_masks
from suite.masks import Masks, Target
from suite.pruner import register


class DDPConfig(MaskLearningConfig):
    forward_map: Literal["relu", "identity", "clamp"] = Field("relu", description="forward mask m(z)")
    m_max: float = Field(2.0, gt=0, description="upper bound of the clamp forward map")
    z_init: float = Field(1.0, description="initial gate value (1 = the dense model)")
    schedule: Literal["linear", "geometric", "cosine", "adaptive"] = Field(
        "geometric", description="mu anneal; adaptive grows mu only while the soft count is near the budget")
    mu_start: float = Field(1.0, gt=0, description="retention sharpness at the first step")
    mu_end: float = Field(100.0, gt=0, description="retention sharpness at the last step")
    adapt_tol: float = Field(0.01, gt=0, description="adaptive schedule: |s_hat - target| below which mu grows")


def mu_at(step: int, steps: int, cfg: DDPConfig) -> float:
    """Scheduled mu for linear, geometric and cosine anneals (the adaptive one is stateful)."""
    p = min(1.0, step / max(1, steps - 1))
    if cfg.schedule == "linear":
        return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * p
    if cfg.schedule == "cosine":
        return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * (1 - math.cos(math.pi * p)) / 2
    return cfg.mu_start * (cfg.mu_end / cfg.mu_start) ** p


class DDPRelaxation(Relaxation):
    config: DDPConfig

    def __init__(self, config: DDPConfig, structure, groups, seed: int) -> None:
        super().__init__(config, structure, groups, seed)
        self.z = {g.name: nn.Parameter(torch.full((g.n_units,), config.z_init)) for g in groups}
        self.mu = config.mu_start
        # adaptive: in-tolerance steps needed to go from mu_start to mu_end (half the budget)
        self._growth = (config.mu_end / config.mu_start) ** (1 / max(1, config.steps // 2))

    def parameters(self) -> dict[str, nn.Parameter]:
        return self.z

    def forward_map(self, z: Tensor) -> Tensor:
        if self.config.forward_map == "relu":
            return torch.relu(z)
        if self.config.forward_map == "clamp":
            return z.clamp(0.0, self.config.m_max)
        return z

    def _mu(self, step: int) -> float:
        return self.mu if self.config.schedule == "adaptive" else mu_at(step, self.config.steps, self.config)

    def train_gates(self, step: int) -> dict[str, Tensor]:
        return {n: self.forward_map(z) for n, z in self.z.items()}

    def keep_probability(self, step: int) -> dict[str, Tensor]:
        mu = self._mu(step)
        return {n: torch.sigmoid(mu * z) for n, z in self.z.items()}

    def discrete_keep(self) -> dict[str, Tensor]:
        return {n: z.detach() > 0 for n, z in self.z.items()}

    def anneal(self, step: int) -> dict[str, float]:
        return {"mu": self._mu(step)}

    def after_step(self, gap: float) -> None:
        if self.config.schedule == "adaptive" and abs(gap) < self.config.adapt_tol:
            self.mu = min(self.config.mu_end, self.mu * self._growth)

    def final(self, target: Target) -> tuple[Masks, dict[str, Any]]:
        z = {n: v.detach() for n, v in self.z.items()}
        masks = rank_masks(self.structure, z, target)
        masks.scale = {n: self.forward_map(v) for n, v in z.items()}
        topped_up = sum(int((masks.keep[n] & (v <= 0)).sum()) for n, v in z.items())
        trimmed = sum(int((~masks.keep[n] & (v > 0)).sum()) for n, v in z.items())
        return masks, {
            # units whose gate is exactly zero are pruned in effect, whatever the top-up keeps (METHODS.md A2)
            "effective_sparsity": effective_sparsity(self.structure, self.discrete_keep()),
            "topped_up_units": topped_up,
            "trimmed_positive_units": trimmed,
            "final_mu": self.mu if self.config.schedule == "adaptive" else self.config.mu_end,
        }


@register("ddp")
class DDP(MaskLearner):
    """Deterministic Differentiable Pruning: relu(z) gates, sigmoid(mu z) retention, annealed mu, exact budget."""

    Config = DDPConfig
    relaxation = DDPRelaxation
