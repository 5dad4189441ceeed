"""The one way reports read results: an MLflow store -> a tidy DataFrame, one row per run.

Reports never import a pruner: everything they show comes from what the runner recorded (params, metrics, tags,
and artifacts such as masks and curves), so a report can be rebuilt from a store alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from suite.errors import ConfigError, DataError
from suite.hashing import digest
from suite.model.masks import Masks
from suite.run.record import (
    ERROR,
    IDENTITY,
    KIND,
    NONFINITE,
    PREFIX,
    PRUNING,
    RECOVERY,
    STAGE_PREFIXES,
    STAGES,
    SWEEP,
    at_stage,
)
from suite.run.tracking import Tracker

ID_COLUMNS = ["experiment", "run_id", "kind", "status", "model", "method", "method_name", "sparsity", "seed",
              "protocol", "protocol_body", "artifact_uri", "error", "achieved_sparsity", "start_time", "nonfinite",
              "sweep", "identity", "pruning", "calibration", "recovery"]
LOCAL = ["artifacts", "items_stage"]  # where this machine finds a run's files (and which stage's item scores to read
# there): used by the report, never exported


def load_results(workdir: Path, experiments: list[str], uri: str | None = None,
                 finished_only: bool = True) -> pd.DataFrame:
    """Dense and pruned runs of `experiments` with their metrics as columns (`ppl.*`, `acc.*`, `mean_acc`, ...)."""
    rows: list[dict[str, Any]] = []
    for name in experiments:
        tracker = Tracker(workdir, name, uri, create=False)
        for run in tracker.client.search_runs([tracker.experiment_id], max_results=50_000):
            tags, params = run.data.tags, run.data.params
            kind = tags.get(KIND)
            if kind not in ("dense", "pruned") or (finished_only and run.info.status != "FINISHED"):
                continue
            row = {
                "experiment": name, "run_id": run.info.run_id, "kind": kind, "status": run.info.status,
                "model": params.get("model", tags.get(PREFIX + "model", "")),
                "method": params.get("label", "dense") if kind == "pruned" else "dense",
                "method_name": params.get("method", "dense"),
                "sparsity": float(params.get("sparsity", 0.0)), "seed": int(params.get("seed", -1)),
                "protocol": tags.get(PREFIX + "protocol", ""), "protocol_body": tags.get(PREFIX + "protocol_body", ""),
                "artifact_uri": run.info.artifact_uri, "error": tags.get(ERROR, ""),
                "start_time": run.info.start_time,
                "artifacts": str(tracker.artifact_dir(run.info.artifact_uri) or ""),
                "code": tags.get(PREFIX + "code", tags.get(PREFIX + "suite_version", "")),
                "calibration_hash": params.get("calibration.hash", ""),
                "units": params.get("units", ""),
                "sweep": tags.get(SWEEP, ""), "identity": tags.get(IDENTITY, ""), "pruning": tags.get(PRUNING, ""),
                "recovery": tags.get(RECOVERY, ""),
                "calibration": json.dumps({k.removeprefix("calibration."): _value(v) for k, v in sorted(params.items())
                                           if k.startswith("calibration.") and k != "calibration.hash"}),
            } | {k: _value(v) for k, v in params.items() if k.startswith("hp.")}
            metrics = dict(run.data.metrics)
            nonfinite = json.loads(tags.get(NONFINITE, "{}"))
            metrics |= {k: float(v) for k, v in nonfinite.items()}  # inf as inf, not MLflow's clamped largest float
            # plain names: the pruned model's numbers (w/o tune); `pruned.*` and `recovered.*` stay for the stage
            # table and `stage_view`
            metrics = at_stage(metrics, "pruned") | {k: v for k, v in metrics.items() if k.startswith(STAGE_PREFIXES)}
            row["nonfinite"] = ",".join(sorted(nonfinite))
            # the `sparsity` param is the grid's target; the metric of that name is what the method achieved
            row["achieved_sparsity"] = metrics.pop("sparsity", row["sparsity"])
            if kind == "dense":  # the reference row of every table
                metrics |= {"params_compact": metrics.get("params_dense"), "retained.mean_acc": 100.0}
            rows.append(row | {k: v for k, v in metrics.items() if k not in row})  # params win (e.g. seed)
    df = distinguish(pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + LOCAL))
    return df.sort_values(["experiment", "model", "kind", "method", "sparsity", "seed"], ignore_index=True)


def stage_view(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The runs as measured at `stage`: "pruned" (w/o tune: every pruning once per protocol, the latest run of it,
    however many recovery stages it went on to) or "recovered" (w/ tune: the runs with a recovery stage, their
    `recovered.*` numbers under the plain names every table and ranking reads; dense references stay). Under one
    label, runs recovered by different recovery stages become different methods (`label[recovery=<hash>]`), never
    seeds of one."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of: {', '.join(STAGES)}")
    if df.empty:
        return df
    if stage == "pruned":  # runs that differ only in their recovery stage measured one pruned model: counted once
        latest = df.sort_values("start_time", kind="stable")
        repeat = (latest["kind"] == "pruned") & latest["pruning"].fillna("").astype(bool)
        repeat &= latest.duplicated(["pruning", "protocol"], keep="last")
        return df.drop(index=latest.index[repeat])
    prefix = f"{stage}."
    recovered = df[(df["kind"] == "dense") | df["recovery"].fillna("").astype(bool)].copy()
    if not (recovered["kind"] == "pruned").any():
        raise ConfigError("no run of these experiments has a recovery stage (set `recovery:` in the experiment); "
                          "--stage recovered has nothing to rank")
    pruned = recovered["kind"] == "pruned"
    recovered.loc[pruned, "items_stage"] = stage  # whose stored item scores the intervals read
    for column in [c for c in recovered.columns if c.startswith(prefix)]:
        recovered.loc[pruned, column.removeprefix(prefix)] = recovered.loc[pruned, column]
    for _, block in recovered[pruned].groupby(["model", "method"], sort=False):
        if block["recovery"].nunique() > 1:
            for index, row in block.iterrows():
                recovered.loc[index, "method"] = f"{row['method']}[recovery={digest(row['recovery'], length=8)}]"
    return recovered


def distinguish(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that share a label but not their configuration (hyperparameters, calibration specification, code) are
    different methods, never seeds of one (each seed may draw its own calibration sample): their `method` becomes
    `label[key=value,...]`, naming what differs. A grid point recorded twice (the same configuration, sparsity, seed
    and protocol) counts once, and so does a dense model measured again under one protocol: the latest run."""
    if df.empty:
        return df
    config = [c for c in df.columns if c.startswith("hp.")] + ["calibration", "code"]
    config = [c for c in config if c in df.columns]
    df = df.copy()
    pruned = df["kind"] == "pruned"
    for _, block in df[pruned].groupby(["model", "method"], sort=False):
        variants = block[config].astype(str).drop_duplicates()
        if len(variants) < 2:
            continue
        differing = [c for c in config if variants[c].nunique() > 1]
        for index, row in block.iterrows():
            shown = ",".join(f"{c.removeprefix('hp.')}={str(row[c])[:12]}" for c in differing)
            df.loc[index, "method"] = f"{row['method']}[{shown}]"
    df = df.sort_values("start_time")
    keys = ["experiment", "model", "kind", "method", "sparsity", "seed", "protocol", "recovery", *config]
    dense = df["kind"] == "dense"  # one reference per model and protocol: the latest measurement
    return pd.concat([df[dense].drop_duplicates(subset=["experiment", "model", "protocol"], keep="last"),
                      df[~dense].drop_duplicates(subset=[k for k in keys if k in df.columns], keep="last")])


def _value(text: str) -> Any:
    """A logged parameter back as a number where it is one (MLflow keeps params as strings)."""
    try:
        return float(text) if any(ch in text for ch in ".eE") or text.lower() in ("nan", "inf") else int(text)
    except ValueError:
        return text


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def neutralise(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (`=HYPERLINK(...)`, a label or path starting with
    + - @), behind a leading quote, the usual rule (OWASP, CSV injection); numbers and other text as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def export(df: pd.DataFrame, path: Path) -> Path:
    """CSV or parquet by suffix (without the machine-local columns). CSV text cells are neutralised against formula
    injection (user-controlled labels, model paths and errors reach them); parquet keeps the data as it is."""
    df = df.drop(columns=[c for c in LOCAL if c in df.columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        text = df.select_dtypes(include=["object", "string"]).columns
        df.assign(**{c: df[c].map(neutralise) for c in text}).to_csv(path, index=False)
    else:
        raise ConfigError(f"cannot export to {path.name}: use .csv or .parquet")
    return path


def artifact(row: pd.Series, name: str) -> Path | None:
    """A file the runner stored with this run (local artifact stores only), or None."""
    if not row.get("artifacts"):
        return None
    path = Path(row["artifacts"]) / name
    return path if path.is_file() else None


def read_json(row: pd.Series, name: str) -> Any | None:
    path = artifact(row, name)
    if path is None:
        return None
    with _damaged(path):
        return json.loads(path.read_text())


def read_masks(row: pd.Series) -> Masks | None:
    """The masks a pruned run stored (keep vectors, and per-group parameter counts in `meta`), or None."""
    path = artifact(row, "masks.safetensors")
    if path is None:
        return None
    with _damaged(path):
        return Masks.load(path.parent)


@contextlib.contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """A stored artifact that cannot be read (truncated, overwritten) is one line naming its file and run."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"damaged artifact {path} (run {path.parent.parent.name}): {first}; restore it, or delete "
                        "that run from the store") from None
