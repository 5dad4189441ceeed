"""What a run records, defined once: the tag keys, the flat metric names, retained %, the parameters, the protocol
tags, the error line and the artifact layout. The runner writes with these and `reports/` reads with them."""

from __future__ import annotations

import json
from typing import Any

from suite.errors import PruneBenchError

PREFIX = "prunebench."
ROLE, IDENTITY, ERROR = PREFIX + "role", PREFIX + "identity", PREFIX + "error"
NONFINITE = PREFIX + "nonfinite"  # JSON {metric: "inf" | "-inf" | "nan"}: MLflow keeps NaN but clamps infinities
KIND = PREFIX + "kind"  # "dense" or "pruned"
WORKER = PREFIX + "worker"
PRUNING = PREFIX + "pruning_identity"
PRUNED_BY = PREFIX + "pruned_by"  # on a run that re-evaluated another run's pruning: that run's id
NESTED_IN = PREFIX + "nested_in"  # on a nested row (GISP): the parent's pruning identity
CODE = PREFIX + "code"
MODEL_ARTIFACT = "model"  # the compact checkpoint, stored when a method rewrote weights
METRICS_ARTIFACT = "metrics.json"


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Evaluation result -> flat MLflow metrics (ppl.<spec>, acc.<task>, acc_norm.<task>, mean_acc)."""
    out = {f"{prefix}ppl.{name}": r["ppl"] for name, r in result["ppl"].items()}
    for task, r in result["tasks"].items():
        out[f"{prefix}acc.{task}"] = r["acc"]
        out[f"{prefix}acc_norm.{task}"] = r["acc_norm"]
    if "mean_acc" in result:
        out[f"{prefix}mean_acc"] = result["mean_acc"]
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


def table_row(spec: Any, run: Any) -> dict[str, Any]:
    """A grid point's row in the table `run` prints (spec: a RunSpec; run: its MLflow run)."""
    m = run.data.metrics
    ppl = next((v for k, v in sorted(m.items()) if k.startswith("ppl.")), float("nan"))
    return {"model": spec.model, "method": spec.label, "sparsity": spec.sparsity, "seed": spec.seed,
            "status": run.info.status, "ppl": ppl, "mean_acc": m.get("mean_acc", float("nan")),
            "retained_acc_%": m.get("retained.mean_acc", float("nan")),
            "params": int(m.get("params_compact", 0)), "prune_s": m.get("prune_seconds", float("nan")),
            "error": run.data.tags.get(ERROR, "")}


def results_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    if not rows:
        return "(no runs)"
    df = pd.DataFrame(rows)
    if not df["error"].astype(bool).any():
        df = df.drop(columns="error")
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
