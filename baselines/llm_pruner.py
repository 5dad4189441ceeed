"""`llm_pruner`: LLM-Pruner's first-order Taylor importance, block-wise (Ma et al., NeurIPS 2023, arXiv 2305.11627)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from suite.methods import (
    Calibration,
    ScorePruner,
    SelectionConfig,
    Structure,
    calibration_ids,
    gradients,
    register,
    taylor_scores,
)


class LLMPrunerConfig(SelectionConfig):
    taylor: Literal["param_first", "param_mix"] = Field(
        "param_first", description="sum |W g| (the reference scripts' choice) or sum |W g - W^2 F / 2|")
    batch_size: int = Field(4, ge=1, description="sequences per backward pass (param_mix: one per sequence)")

    budget: ClassVar[frozenset[str]] = frozenset({"batch_size"})


@register("llm_pruner")
class LLMPruner(ScorePruner):
    """LLM-Pruner: first-order Taylor importance of every weight a unit owns, per-layer ratio.

    Element-wise Taylor importance |W * dL/dW| (plus the diagonal-Fisher term under `param_mix`) summed over
    every weight a unit owns; per-layer uniform ratio by default; LLM-Pruner's layer skipping is the target's
    `skip_layers` (e.g. [0, 1, 2, 3, 30, 31] for a 32-layer model)."""

    Config = LLMPrunerConfig
    needs_calibration = True

    def scores(self, model: nn.Module, structure: Structure, calibration: Calibration | None, *,
               seed: int) -> dict[str, Tensor]:
        cfg = self.config
        ids = calibration_ids(self.name, calibration)
        return taylor_scores(model, structure, gradients(model, structure, ids, fisher=cfg.taylor == "param_mix",
                                                         batch_size=cfg.batch_size))
