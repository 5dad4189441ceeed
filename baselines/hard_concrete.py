"""Hard-concrete L0 with a Lagrangian (Louizos et al. 2018 -> CoFi -> Sheared-LLaMA;
docs/methods.md, hard-concrete):
log-alpha per unit, stochastic stretched-and-clamped gates in training, expected L0 in the regulariser, and a
deterministic test-time mask. The defaults are Sheared-LLaMA's reference code (log alpha 5 clamped to +-4.6, the
target ramped from 0 over the first 20% of steps, plain gradient ascent on the multipliers), mask-only (weights
frozen, as in DDP) so that the comparison with DDP isolates the relaxation; the learning rates follow the engine's
one reading for every mask learner (travel / steps)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from suite.methods import MaskLearner, MaskLearningConfig, Masks, Relaxation, Target, rank_masks, register

EPS = 1e-6


class HardConcreteConfig(MaskLearningConfig):
    beta: float = Field(2 / 3, gt=0, description="temperature of the concrete distribution")
    l: float = Field(-0.1, lt=0, description="stretch lower end (gamma)")  # noqa: E741 - the papers' name
    r: float = Field(1.1, gt=1, description="stretch upper end (zeta)")
    log_alpha_init: float = Field(5.0, description="initial log alpha (Sheared-LLaMA's 5, clamped to 4.6 after the "
                                  "first step: every unit kept with p = 0.998)")
    init_std: float = Field(0.01, ge=0, description="std of the log alpha initialisation")
    clamp: float = Field(4.6, ge=0, description="clamp log alpha to [-c, c] after each step (0 = off)")
    test_mask: Literal["sheared", "louizos"] = Field(
        "sheared", description="deterministic mask: Sheared-LLaMA soft values, or Louizos's clamp rule")
    mismatch_samples: int = Field(4, ge=1, description="sampled training masks averaged in the mismatch")
    target_warmup: float = Field(0.2, ge=0, le=1, description="fraction of steps to ramp the target from 0 "
                                 "(Sheared-LLaMA's Lagrangian warm-up, 20% of its pruning steps)")

    budget: ClassVar[frozenset[str]] = MaskLearningConfig.budget | {"mismatch_samples"}


def keep_probability(log_alpha: Tensor, cfg: HardConcreteConfig) -> Tensor:
    """P(z != 0) = sigmoid(log_alpha - beta log(-l / r)), the expected L0 of one gate (closed form)."""
    return torch.sigmoid(log_alpha - cfg.beta * math.log(-cfg.l / cfg.r))


def sample(log_alpha: Tensor, cfg: HardConcreteConfig, generator: torch.Generator) -> Tensor:
    """z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (r - l) + l, 0, 1), u ~ U(eps, 1 - eps)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(EPS, 1 - EPS).to(log_alpha)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / cfg.beta)
    return (s * (cfg.r - cfg.l) + cfg.l).clamp(0.0, 1.0)


def deterministic(log_alpha: Tensor, cfg: HardConcreteConfig) -> Tensor:
    """Test-time gate values: Sheared-LLaMA's sigmoid(log_alpha / beta * 0.8), or Louizos's clamp rule."""
    if cfg.test_mask == "sheared":
        return torch.sigmoid(log_alpha / cfg.beta * 0.8)
    return (torch.sigmoid(log_alpha) * (cfg.r - cfg.l) + cfg.l).clamp(0.0, 1.0)


class HardConcreteRelaxation(Relaxation):
    config: HardConcreteConfig

    def __init__(self, config: HardConcreteConfig, structure, groups, seed: int) -> None:
        super().__init__(config, structure, groups, seed)
        init = torch.Generator().manual_seed(seed)
        self.log_alpha = {
            g.name: nn.Parameter(config.log_alpha_init + config.init_std * torch.randn(g.n_units, generator=init))
            for g in groups
        }
        self.noise = torch.Generator().manual_seed(seed + 1)

    def parameters(self) -> dict[str, nn.Parameter]:
        return self.log_alpha

    def train_gates(self, step: int) -> dict[str, Tensor]:
        return {n: sample(a, self.config, self.noise) for n, a in self.log_alpha.items()}

    def keep_probability(self, step: int) -> dict[str, Tensor]:
        return {n: keep_probability(a, self.config) for n, a in self.log_alpha.items()}

    def discrete_keep(self) -> dict[str, Tensor]:
        """Sheared-LLaMA's test-time count: in every group, round(expected number of zeros) units with the lowest
        log alpha are removed. Its sparsity is the expected L0 the Lagrangian holds at the target, which a
        `p > 0.5` threshold is not: with log alpha clamped at -4.6 a pruned unit still keeps p = 0.047."""
        keep = {}
        for n, a in self.log_alpha.items():
            a = a.detach()
            zeros = round(float((1.0 - keep_probability(a, self.config)).sum()))
            k = torch.ones(a.numel(), dtype=torch.bool)
            k[torch.sort(a, stable=True).indices[:zeros]] = False
            keep[n] = k
        return keep

    def anneal(self, step: int) -> dict[str, float]:
        return {"temperature": self.config.beta}

    def after_step(self, gap: float) -> None:
        if self.config.clamp:
            with torch.no_grad():
                for a in self.log_alpha.values():
                    a.clamp_(-self.config.clamp, self.config.clamp)

    def mismatch_gates(self) -> list[dict[str, Tensor]]:
        with torch.no_grad():
            return [self.train_gates(self.config.steps) for _ in range(self.config.mismatch_samples)]

    def final(self, target: Target) -> tuple[Masks, dict[str, Any]]:
        log_alpha = {n: a.detach() for n, a in self.log_alpha.items()}
        masks = rank_masks(self.structure, log_alpha, target, self.seed)  # exact budget: Sheared's eval_target_model
        masks.scale = {n: deterministic(a, self.config) for n, a in log_alpha.items()}
        return masks, {}


@register("hard_concrete")
class HardConcrete(MaskLearner):
    """Hard-concrete L0 gates with a Lagrangian (Louizos / CoFi / Sheared-LLaMA), mask-only by default."""

    Config = HardConcreteConfig
    relaxation = HardConcreteRelaxation
    search_space: ClassVar[dict[str, dict[str, Any]]] = {  # where the gates start, then the engine's knobs
        "log_alpha_init": {"type": "float", "low": 0.5, "high": 5.0},
        **MaskLearner.search_space,
    }
