"""DDP: one real gate z per unit, a deterministic forward mask m = relu(z), and a retention score
s = sigmoid(mu z) that feeds only the regulariser; mu is annealed so that sum(s) approaches the l0 count
(docs/methods.md, DDP). The final mask keeps z > 0 and tops up or trims by z to hit the budget exactly; the kept
gate values are folded into the consumer weights at compaction.

The defaults are the paper's method (relu and sigmoid are this project's reading of its "soft sigmoid projection"
and "expanded mask range"; the paper's learning rates and mu schedule are not public). Each fix this project tried
against the failure modes of a short run is a setting that is off by default and names itself in a row's label:
`wait` holds mu low until the hard count reaches the target, `dense_start` makes the dense start count as dense, the
engine's `overshoot` resets or damps the multipliers when the gap changes sign and its `polish` re-fits the kept
gates after a top-up or trim. `preset: budget-safe` turns on the combination the DDP ablation supported (wait,
dense_start, overshoot reset)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.methods import MaskLearner, MaskLearningConfig, Masks, Relaxation, Target, rank_masks, register


class DDPConfig(MaskLearningConfig):
    forward_map: Literal["relu", "identity", "clamp"] = Field("relu", description="forward mask m(z)")
    m_max: float = Field(2.0, gt=0, description="upper bound of the clamp forward map")
    z_init: float = Field(1.0, gt=0, description="initial gate value (1 = the dense model)")
    schedule: Literal["linear", "geometric", "cosine", "adaptive"] = Field(
        "geometric", description="mu anneal; adaptive grows mu while the hard count is within adapt_tol of the "
        "target (or once wait_cap of the run has passed), at the rate that lands mu_end on the last step")
    mu_start: float = Field(1.0, gt=0, description="retention sharpness at the first step")
    mu_end: float = Field(100.0, gt=0, description="retention sharpness at the last step")
    adapt_tol: float = Field(0.01, gt=0, description="adaptive schedule: |hard sparsity - target| below which mu "
                             "grows")
    wait: bool = Field(False, description="project addition: hold mu at mu_start until the hard sparsity is within "
                       "wait_tol of the target or wait_cap of the run has passed, then anneal to mu_end over the "
                       "remaining steps")
    wait_tol: float = Field(0.02, gt=0, description="wait: hard-sparsity distance to the target that starts the anneal")
    wait_cap: float = Field(0.6, gt=0, le=1, description="wait and adaptive: fraction of the run after which mu "
                            "anneals whatever the hard count")
    dense_start: bool = Field(False, description="project addition: rescale the retention so that z_init counts as "
                              "kept and -z_init as removed at every mu (the dense start counts as dense, not "
                              "1 - sigmoid(mu z_init))")

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "budget-safe": MaskLearningConfig.presets["budget-safe"] | {"wait": True, "dense_start": True}}


def mu_at(step: int, steps: int, cfg: DDPConfig, start: int = 0) -> float:
    """Scheduled mu for linear, geometric and cosine anneals that begin at step `start` (0, or where a waiting
    schedule switched) and end at mu_end on the last step whatever the run's length."""
    p = min(1.0, max(0.0, (step - start) / max(1, steps - 1 - start)))
    if cfg.schedule == "linear":
        return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * p
    if cfg.schedule == "cosine":
        return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * (1 - math.cos(math.pi * p)) / 2
    return cfg.mu_start * (cfg.mu_end / cfg.mu_start) ** p


def retention(z: Tensor, mu: float, cfg: DDPConfig) -> Tensor:
    """s = sigmoid(mu z), or under `dense_start` the same curve stretched so that s(z_init) = 1 and s(-z_init) = 0:
    the threshold z = 0 still maps to 1/2, and the stretch vanishes as mu grows (at mu = 10 it is under 1e-4)."""
    s = torch.sigmoid(mu * z)
    if not cfg.dense_start:
        return s
    low = 1.0 - torch.sigmoid(torch.tensor(mu * cfg.z_init, dtype=z.dtype))
    return ((s - low) / (1.0 - 2.0 * low)).clamp(0.0, 1.0)


class DDPRelaxation(Relaxation):
    config: DDPConfig

    def __init__(self, config: DDPConfig, structure, groups, seed: int) -> None:
        super().__init__(config, structure, groups, seed)
        self.z = {g.name: nn.Parameter(torch.full((g.n_units,), config.z_init)) for g in groups}
        self.mu = config.mu_start  # the adaptive schedule's state, and the last mu used by any schedule
        waits = config.wait and config.schedule != "adaptive"
        self.switch: int | None = None if waits else 0  # the step the anneal starts at

    def parameters(self) -> dict[str, nn.Parameter]:
        return self.z

    def forward_map(self, z: Tensor) -> Tensor:
        if self.config.forward_map == "relu":
            return torch.relu(z)
        if self.config.forward_map == "clamp":
            return z.clamp(0.0, self.config.m_max)
        return z

    def _mu(self, step: int) -> float:
        if self.config.schedule != "adaptive":
            self.mu = self.config.mu_start if self.switch is None else mu_at(step, self.config.steps, self.config,
                                                                            self.switch)
        return self.mu

    def train_gates(self, step: int) -> dict[str, Tensor]:
        return {n: self.forward_map(z) for n, z in self.z.items()}

    def keep_probability(self, step: int) -> dict[str, Tensor]:
        mu = self._mu(step)
        return {n: retention(z, mu, self.config) for n, z in self.z.items()}

    def discrete_keep(self) -> dict[str, Tensor]:
        return {n: z.detach() > 0 for n, z in self.z.items()}

    def anneal(self, step: int) -> dict[str, float]:
        return {"mu": self._mu(step)}

    def observe(self, step: int, hard_gap: float) -> None:
        cfg = self.config
        capped = step + 1 >= cfg.wait_cap * cfg.steps
        if self.switch is None and (abs(hard_gap) <= cfg.wait_tol or capped):
            self.switch = step + 1
        remaining = cfg.steps - 1 - step
        if cfg.schedule == "adaptive" and remaining > 0 and (abs(hard_gap) < cfg.adapt_tol or capped):
            self.mu *= (cfg.mu_end / self.mu) ** (1 / remaining)

    def final(self, target: Target) -> tuple[Masks, dict[str, Any]]:
        z = {n: v.detach() for n, v in self.z.items()}
        masks = rank_masks(self.structure, z, target, self.seed)
        masks.scale = {n: self.forward_map(v) for n, v in z.items()}
        topped_up = sum(int((masks.keep[n] & (v <= 0)).sum()) for n, v in z.items())
        trimmed = sum(int((~masks.keep[n] & (v > 0)).sum()) for n, v in z.items())
        return masks, {"topped_up_units": topped_up, "trimmed_positive_units": trimmed, "final_mu": self.mu,
                       "anneal_start": self.switch if self.switch is not None else self.config.steps}


@register("ddp")
class DDP(MaskLearner):
    """Deterministic Differentiable Pruning: relu(z) gates, sigmoid(mu z) retention, annealed mu, exact budget."""

    Config = DDPConfig
    relaxation = DDPRelaxation
    search_space: ClassVar[dict[str, dict[str, Any]]] = {  # the anneal schedule, then the engine's knobs
        "schedule": {"type": "categorical", "choices": ["linear", "geometric", "cosine", "adaptive"]},
        "mu_start": {"type": "float", "low": 0.5, "high": 5.0, "log": True},
        "mu_end": {"type": "float", "low": 10.0, "high": 500.0, "log": True},
        **MaskLearner.search_space,
    }
