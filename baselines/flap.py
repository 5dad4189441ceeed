"""`flap`: fluctuation-based adaptive structured pruning with bias compensation (An et al., AAAI 2024,
arXiv 2312.11983)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from suite.methods import (
    Calibration,
    InputStats,
    MethodConfig,
    Pruner,
    PruneResult,
    Structure,
    Target,
    add_output_bias,
    calibration_ids,
    consumer_weight,
    register,
    remove_units,
    select,
    unit_columns,
    walk,
)


class FlapConfig(MethodConfig):
    metric: Literal["wifv", "ifv", "wifn"] = Field("wifv", description="WIFV (default), IFV, or WIFN column metric")
    structure: Literal["al_am", "ul_um"] = Field(
        "al_am", description="al_am: standardised scores ranked globally; ul_um: uniform ratio per layer")
    bias: bool = Field(True, description="compensate removed columns with their calibration mean (new biases)")
    batch_size: int = Field(8, ge=1)

    budget: ClassVar[frozenset[str]] = frozenset({"batch_size"})


def column_metric(metric: str, weight: Tensor, stats: InputStats) -> Tensor:
    """Per consumer input column: WIFV = Var(X_j) ||W_:j||^2, IFV = Var(X_j), WIFN = mean_i|W_ij| sqrt(mean X_j^2)."""
    w = weight.detach().double().cpu()
    if metric == "wifv":
        return stats.variance * (w * w).sum(0)
    if metric == "ifv":
        return stats.variance
    return w.abs().mean(0) * (stats.sumsq / max(stats.n, 1)).sqrt()


def standardize(x: Tensor) -> Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


@register("flap")
class Flap(Pruner):
    """FLAP: fluctuation scores from one dense pass, standardised global ranking, bias compensation.

    Statistics come from one dense pass (FLAP measures every layer on the unpruned model, then selects globally);
    the attention metric is squared as in the reference code; under `al_am` each group's column scores are
    standardised, a unit scores the mean of its columns, and units are ranked across all layers by raw score with
    parameter-counted budget. Removed columns' mean contribution W[:, S] mean(X_S) becomes a bias of o_proj /
    down_proj. Experts get no compensation: the fused expert layout has no bias."""

    Config = FlapConfig
    needs_calibration = True
    offloads = True

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        cfg = self.config
        ids = calibration_ids(self.name, calibration)
        scores: dict[str, Tensor] = {}
        means: dict[str, Tensor] = {}
        for layer, stats in walk(model, structure, ids, sequential=False, batch_size=cfg.batch_size,
                                 device=self.device):
            for g in structure.layer_groups(layer):
                column = column_metric(cfg.metric, consumer_weight(model, g), stats[g.name])
                if g.kind == "attn":
                    column = column**2
                cols = unit_columns(g)
                if cfg.structure == "al_am":
                    scores[g.name] = standardize(column)[cols].mean(1)
                else:
                    scores[g.name] = column[cols].sum(1)
                means[g.name] = stats[g.name].mean
        mode = "global" if cfg.structure == "al_am" else "per_layer"
        masks = select(structure, scores, target, mode=mode, normalize="raw", seed=seed)
        for g in structure.groups:
            keep = masks.keep[g.name]
            if keep.all():
                continue
            if cfg.bias and g.kind != "expert":
                removed = unit_columns(g)[~keep].flatten()
                w = consumer_weight(model, g).detach()
                add_output_bias(model, g, w[:, removed].double() @ means[g.name][removed].to(w.device))
            remove_units(model, g, keep)
        return PruneResult(masks)
