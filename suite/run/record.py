"""What a run records, defined once: the tag keys, the flat metric names, retained %, the parameters, the protocol
tags, the error line and the artifact layout. The runner writes with these and `reports/` reads with them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from suite.errors import PruneBenchError
from suite.registry import Registry

PREFIX = "prunebench."
ROLE, IDENTITY, ERROR = PREFIX + "role", PREFIX + "identity", PREFIX + "error"
NONFINITE = PREFIX + "nonfinite"  # JSON {metric: "inf" | "-inf" | "nan"}: MLflow keeps NaN but clamps infinities
KIND = PREFIX + "kind"  # "dense" or "pruned"
WORKER = PREFIX + "worker"
PRUNING = PREFIX + "pruning_identity"
PRUNED_BY = PREFIX + "pruned_by"  # on a run that re-evaluated another run's pruning: that run's id
NESTED_IN = PREFIX + "nested_in"  # on a nested row (GISP): the parent's pruning identity
CODE = PREFIX + "code"
SWEEP = PREFIX + "sweep"  # JSON {knob: value} of a params-grid variant; its values are also its hp.* params
RECOVERY = PREFIX + "recovery"  # JSON of the run's recovery stage (RecoverySpec.fingerprint()); absent without one
MODEL_ARTIFACT = "model"  # the compact checkpoint, stored when a method rewrote weights
METRICS_ARTIFACT = "metrics.json"
RECOVERY_ARTIFACT = "recovery.json"  # the recovery stage's spec, data hash, curves and cost


@dataclass(frozen=True)
class Metric:
    """How a recorded metric reads: its label in tables and plots, and its direction (None: shown, never ranked)."""

    label: str  # "{name}" stands for what follows the prefix of a `prefix.*` family (ppl.<spec>, acc.<task>)
    higher_is_better: bool | None


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, label: str, higher_is_better: bool | None) -> Metric:
    """`name` is a metric, or `prefix.*` for a family of them."""
    return METRICS.add(name, Metric(label, higher_is_better))


def metric(column: str) -> Metric:
    """The metadata of `column`: its own, its family's (`ppl.*`), or a plain label ranked higher-is-better."""
    prefix, _, name = column.partition(".")
    found = METRICS.get(column) or METRICS.get(f"{prefix}.*")
    if found is None:
        return Metric(name or column, True)
    return Metric(found.label.format(name=name), found.higher_is_better)


for _name, _label, _higher in (
    ("ppl.*", "{name} ppl", False), ("acc.*", "{name}", True), ("acc_norm.*", "{name} (norm)", True),
    ("mean_acc", "mean acc", True), ("retained.mean_acc", "retained %", True), ("params_compact", "params", None),
    ("diag_relaxed_sparsity", "relaxed sp.", None), ("speed.prefill_speedup", "speedup", True),
    ("prune_seconds", "prune s", False), ("acc_stderr.*", "{name} stderr", None),
    ("mean_acc_stderr", "mean acc stderr", None),
):
    register_metric(_name, _label, _higher)


STAGES = {"pruned": "w/o tune", "recovered": "w/ tune"}  # a run's two stages, and how tables head them
STAGE_PREFIXES = tuple(f"{stage}." for stage in STAGES)
UNSTAGED = ("dense.", "speed.")  # measured once per run whatever the stage: the dense reference, and shapes' speed


def staged(metrics: Mapping[str, float], stage: str) -> dict[str, float]:
    """A stage's evaluation metrics under its prefix (`pruned.ppl.X`, `recovered.mean_acc`): a run with a recovery
    stage records both, so no plain name leaves open which model it measured."""
    return {k if k.startswith(UNSTAGED) else f"{stage}.{k}": v for k, v in metrics.items()}


def at_stage(metrics: Mapping[str, float], stage: str) -> dict[str, float]:
    """A run's metrics as measured at `stage` ("pruned" or "recovered"), under their plain names; a run without a
    recovery stage measured only "pruned", under plain names already (its "recovered" view is empty)."""
    prefix = f"{stage}."
    if not any(k.startswith(STAGE_PREFIXES) for k in metrics):
        return dict(metrics) if stage == "pruned" else {}
    own = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    return {k: v for k, v in metrics.items() if not k.startswith(STAGE_PREFIXES)} | own


MISS_TOLERANCE = 0.02  # a relaxation ending further than this from its target sparsity: the projection decided


def missed(relaxed: float | None, target: float) -> bool:
    """Did a mask learner's relaxation miss its budget (the exact-budget projection decided the rest)?"""
    return relaxed is not None and abs(relaxed - target) > MISS_TOLERANCE


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Evaluation result -> flat MLflow metrics (ppl.<spec>, acc.<task>, acc_norm.<task>, mean_acc)."""
    out = {f"{prefix}ppl.{name}": r["ppl"] for name, r in result["ppl"].items()}
    for task, r in result["tasks"].items():
        out[f"{prefix}acc.{task}"] = r["acc"]
        out[f"{prefix}acc_norm.{task}"] = r["acc_norm"]
        if r.get("acc_stderr") == r.get("acc_stderr"):  # lm-eval's item-level stderr, where it gave one
            out[f"{prefix}acc_stderr.{task}"] = r["acc_stderr"]
    if "mean_acc" in result:
        out[f"{prefix}mean_acc"] = result["mean_acc"]
        errors = [r.get("acc_stderr", math.nan) for r in result["tasks"].values()]
        if errors and all(e == e for e in errors):  # independent tasks: the mean's stderr
            out[f"{prefix}mean_acc_stderr"] = math.sqrt(sum(e * e for e in errors)) / len(errors)
    return out


def retained(pruned: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """`retained.<metric>`: the pruned value as a percentage of the dense one (where the dense one is non-zero)."""
    return {f"retained.{k}": 100 * v / dense[k] for k, v in pruned.items() if dense.get(k)}


def protocol_tags(protocol: dict[str, Any]) -> dict[str, str]:
    """The protocol hash to group by, and its body so a report can say how two protocols differ."""
    return {PREFIX + "protocol": protocol["hash"], PREFIX + "protocol_body": json.dumps(protocol, sort_keys=True)}


def error_line(err: BaseException) -> str:
    """The one line a FAILED run keeps: prunebench's own message, or the exception's type and first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if not isinstance(err, PruneBenchError) else text


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: value}


def run_params(*, model: str, method: str, label: str, sparsity: float, seed: int, granularity: str, dtype: str,
               hyperparameters: dict[str, Any], target: dict[str, Any], calibration: dict[str, Any],
               recovery: dict[str, Any] | None = None) -> dict[str, Any]:
    """The MLflow params of a pruning, the same for a grid run and a tuning trial (`hp.*` = the method's resolved
    config), so both line up in one compare view; `recovery.*`: the recovery stage, when the run has one."""
    return ({"model": model, "method": method, "label": label, "sparsity": sparsity, "seed": seed,
             "granularity": granularity, "dtype": dtype}
            | flatten("hp", hyperparameters) | flatten("target", target) | flatten("calibration", calibration)
            | flatten("recovery", recovery or {}))


def table_row(spec: Any, run: Any) -> dict[str, Any]:
    """A grid point's row in the table `run` prints (spec: a RunSpec; run: its MLflow run)."""
    m = at_stage(run.data.metrics, "pruned")
    swept = {f"hp.{k}": v for k, v in spec.sweep.items()}
    row = {"model": spec.model, "method": spec.label, **swept, "sparsity": spec.sparsity, "seed": spec.seed,
           "status": run.info.status, **_headline(m)}
    if spec.recovery:  # w/ tune beside w/o tune
        row |= {f"tuned_{k}": v for k, v in _headline(at_stage(run.data.metrics, "recovered")).items()}
    return row | {"params": int(m.get("params_compact", 0)), "prune_s": m.get("prune_seconds", float("nan")),
                  "error": run.data.tags.get(ERROR, "")}


def _headline(m: Mapping[str, float]) -> dict[str, float]:
    ppl = next((v for k, v in sorted(m.items()) if k.startswith("ppl.")), float("nan"))
    return {"ppl": ppl, "mean_acc": m.get("mean_acc", float("nan")),
            "retained_acc_%": m.get("retained.mean_acc", float("nan"))}


def results_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    if not rows:
        return "(no runs)"
    df = pd.DataFrame(rows).drop(columns=["found"], errors="ignore")  # progress bookkeeping, not a result
    swept = [c for c in df.columns if c.startswith("hp.")]
    df[swept] = df[swept].astype(object).where(df[swept].notna(), "-")  # methods without that knob
    rest = [c for c in df.columns if c not in swept]
    df = df[[*rest[:2], *swept, *rest[2:]]]  # model, method, the swept knobs, then the numbers
    if not df["error"].astype(bool).any():
        df = df.drop(columns="error")
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
