"""`gisp`: Global Iterative Structured Pruning (Wang et al., arXiv 2510.18030).

Each iteration recomputes first-order Taylor importance |W * dL/dW| on the currently masked model, normalises it per
block, ranks all units of all layers together and masks the lowest ones up to the iteration's sparsity. Masked units
get no gradient, so their score is zero and the pruned set only grows: the masks met on the way are nested
subnetworks ("prune once, deploy many"), and the ones at `nested` sparsities are returned next to the final masks.
With `objective: margin` the gradients are those of GISP's decision-task loss, the mean NLL of the right answers
minus that of the wrong ones, over train-split items of the embedded tasks (never the evaluated test items).

Differences from the reference code, on purpose: sparsity is counted in parameters (the project's definition; GISP's
ratio counts structures), units are masked by gates rather than zeroed weights (the same forward), and GQA units
follow the suite's granularity (`kv_group` removes whole KV groups, which is what shrinks the KV cache).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from torch import Tensor, nn

from suite.methods import (
    Calibration,
    ConfigError,
    Gates,
    Group,
    Masks,
    MethodConfig,
    Pruner,
    PruneResult,
    Structure,
    Target,
    calibration_ids,
    gradients,
    register,
    select,
    taylor_scores,
)


class GispConfig(MethodConfig):
    iterations: int = Field(40, ge=1, description="pruning steps from 0 to the target (GISP: 112 for 7B models)")
    schedule: Literal["linear", "cosine", "exp"] = Field("linear", description="sparsity per iteration")
    nested: list[float] = Field(default_factory=list, description="lower sparsities whose masks are also kept")
    prune_skip: bool = Field(False, description="never prune the first 10% of layers and the last layer (GISP)")
    batch_size: int = Field(4, ge=1, description="sequences per backward pass")
    objective: Literal["lm", "margin"] = Field(
        "lm", description="lm: next-token loss on the calibration text; margin: NLL(right answer) - NLL(wrong "
        "answers) on the train items of calibration.tasks (GISP's decision-task objective)")

    @field_validator("nested")
    @classmethod
    def _in_unit_interval(cls, values: list[float]) -> list[float]:
        if any(not 0 < v < 1 for v in values):
            raise ValueError("nested sparsities must lie in (0, 1)")
        return sorted(set(values))

    # `nested` only chooses which masks met on the way are kept as rows of their own: the run's masks are the same
    budget: ClassVar[frozenset[str]] = frozenset({"iterations", "batch_size", "nested"})


def schedule(kind: str, target: float, iterations: int) -> list[float]:
    """Sparsity after each iteration, ending exactly at `target`."""
    steps = [(t + 1) / iterations for t in range(iterations)]
    if kind == "cosine":
        steps = [(1 - math.cos(math.pi * s)) / 2 for s in steps]
    elif kind == "exp":  # fast early, slow late, as GISP's exponential schedule
        steps = [(1 - math.exp(-4 * s)) / (1 - math.exp(-4)) for s in steps]
    return [target * s for s in steps]


def block_normalised(group: Group, score: Tensor) -> Tensor:
    """GISP's block-wise normalisation: a head by its parameters (4 d_h d), a channel by 3 x its block's width."""
    if group.kind == "attn":
        return score / group.unit_params
    return score / (3 * group.n_units)


@register("gisp")
class Gisp(Pruner):
    """GISP: iterative global first-order Taylor pruning with block-wise normalisation and nested masks."""

    Config = GispConfig
    needs_calibration = True
    quick: ClassVar[dict[str, Any]] = {"iterations": 4}

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        cfg = self.config
        ids, weights = calibration_ids(self.name, calibration), None
        if cfg.objective == "margin":
            if calibration.margin is None:
                raise ConfigError("gisp.objective 'margin' needs task items: set calibration.tasks "
                                  "(CLI: --calib 'tasks=[pb_return]')")
            ids, weights = calibration.margin
        if cfg.prune_skip:
            first = math.floor(0.1 * structure.n_layers)
            target = target.model_copy(update={"skip_layers": tuple(sorted(
                {*target.skip_layers, *range(first), structure.n_layers - 1}))})
        levels = sorted({*schedule(cfg.schedule, target.sparsity, cfg.iterations),
                         *(s for s in cfg.nested if s < target.sparsity)})
        masks = Masks.dense(structure)
        nested: dict[float, Masks] = {}
        curve: list[float] = []
        with Gates(model, structure) as gates:
            for step, level in enumerate(levels):
                gates.apply_masks(masks)
                taylor = taylor_scores(model, structure, gradients(model, structure, ids, batch_size=cfg.batch_size,
                                                                      weights=weights))
                scores = {g.name: block_normalised(g, taylor[g.name]).masked_fill(~masks.keep[g.name], -1.0)
                          for g in structure.groups}  # masked units get no gradient; -1 keeps them pruned
                masks = select(structure, scores, target.model_copy(update={"sparsity": level}), mode="global",
                               normalize="raw", seed=seed)
                curve.append(masks.sparsity(structure))
                if level in cfg.nested:
                    nested[level] = masks
                if self.step_callback is not None:
                    self.step_callback(step, {"sparsity": curve})
        return PruneResult(masks, curves={"sparsity": curve}, nested=nested,
                           diagnostics={"iterations": len(levels), "nested": sorted(nested)})
