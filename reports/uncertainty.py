"""Every number of a table with its uncertainty over the right units: seeds (each with its own calibration draw) and
evaluation items (a task's documents, a perplexity's windows), read from the item scores each run stored.

A cell is (model, sparsity); in it, each method's seeds are rows and the evaluation items columns, the same items for
every seed and method. `suite.stats.crossed` gives a cell mean's interval and the paired test of two methods (on the
seeds both ran and the items all runs scored); ranks come from a bootstrap that resamples seeds and items jointly
(the same item draw for every method, seed and cell), each method ranked in each draw. Accuracy is read as retained %
(pruned over dense on the same items: the dense model's own item noise is in the interval), perplexity as the mean
token NLL over windows and seeds, shown as exp of it.

A run recorded before item scores were stored has no interval ("–"); it is never given one from another unit.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from suite.run.record import METRICS_ARTIFACT
from suite.run.tracking import metric_key
from suite.stats import crossed, holm, percentile_interval

ACC = "acc"  # the accuracy measure: the mean over tasks of task accuracy, read as retained % of dense
DRAWS = 1000  # bootstrap draws for rank intervals
CELL_KEYS = ["model", "sparsity"]
BROKEN_NOTE = ("✗ broken: the pruned model's perplexity is above its vocabulary size, worse than a uniform guess over "
               "the vocabulary; its accuracy is noise around chance, and it is never named best.")
COVERS = {1: "items (n = 1 seed)", 0: "–"}  # otherwise "seeds × items"


def covers(seeds: int) -> str:
    """What a cell's interval covers, in words: one seed cannot show the seed-to-seed (calibration draw) spread."""
    return COVERS.get(seeds, "seeds × items")


@functools.lru_cache(maxsize=4096)
def _evaluation(folder: str, kind: str, stage: str) -> dict[str, Any] | None:
    path = Path(folder)
    if kind == "dense":
        file = path / "evaluation.json"
        return json.loads(file.read_text()) if file.is_file() else None
    file = path / METRICS_ARTIFACT
    if not file.is_file():
        return None
    evaluation = json.loads(file.read_text()).get("evaluation") or {}
    return evaluation.get("recovered") if stage == "recovered" else evaluation


def evaluation(row: pd.Series) -> dict[str, Any] | None:
    """The full evaluation result a run stored (at the stage its row shows), or None without local files."""
    folder = row.get("artifacts")
    if not isinstance(folder, str) or not folder:
        return None
    return _evaluation(folder, str(row["kind"]), str(row.get("items_stage") or "pruned"))


def item_scores(row: pd.Series, measure: str) -> dict[str, dict[Any, float]] | None:
    """A run's item scores for `measure`: {task: {doc id: 0/1}} for ACC, {spec: {window: token NLL sum / mean window
    tokens}} for `ppl.<spec>`; None where the run stored none."""
    result = evaluation(row)
    if result is None:
        return None
    if measure == ACC:
        tasks = result.get("tasks") or {}
        if not tasks or any("items" not in t for t in tasks.values()):
            return None
        return {name: dict(zip(t["items"]["doc_id"], t["items"]["acc"], strict=True)) for name, t in tasks.items()}
    # the column is the spec's MLflow key (`ppl.embedded_test_256`); the stored result keys the spec itself
    ppl = next((r for spec, r in (result.get("ppl") or {}).items() if metric_key(f"ppl.{spec}") == measure), None)
    if not ppl or "windows" not in ppl:
        return None
    nll, tokens = ppl["windows"]["nll"], ppl["windows"]["tokens"]
    scale = sum(tokens) / len(tokens)  # so that the mean over windows is the token-weighted mean NLL
    return {measure: {i: v / scale for i, v in enumerate(nll)}}


def vocab_size(row: pd.Series) -> float:
    result = evaluation(row)
    return float(result.get("vocab_size", math.nan)) if result else math.nan


def broken(runs: pd.DataFrame) -> pd.Series:
    """Per run: is its perplexity (any) above its vocabulary size, or not finite? A uniform guess over the vocabulary
    scores exactly the vocabulary size; a model worse than that is broken, whatever its accuracy."""
    ppl = [c for c in runs.columns if c.startswith("ppl.")]
    if not ppl or runs.empty:
        return pd.Series(False, index=runs.index)
    values = runs[ppl].astype(float)
    vocab = pd.Series([vocab_size(r) for _, r in runs.iterrows()], index=runs.index)
    over = values.gt(vocab, axis=0).any(axis=1)
    diverged = (~np.isfinite(values) & values.notna()).any(axis=1)
    return (over | diverged) & (runs["kind"] == "pruned")


def measures(runs: pd.DataFrame) -> list[str]:
    """The measures a board has: accuracy where tasks were scored, then each perplexity."""
    out = [ACC] if any(c.startswith("acc.") for c in runs.columns) else []
    return out + sorted(c for c in runs.columns if c.startswith("ppl.") and runs[c].notna().any())


def higher_is_better(measure: str) -> bool:
    return measure == ACC


@dataclass
class Cell:
    """One (model, sparsity) cell's item scores for one measure: per method, per seed, one vector per stratum, on the
    items every run of the cell (and the dense reference) scored."""

    model: str
    sparsity: float
    measure: str
    strata: list[str]
    dense: list[np.ndarray] | None
    runs: dict[str, dict[int, list[np.ndarray]]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)  # methods with a run that stored no item scores

    def matrix(self, method: str, seeds: Iterable[int] | None = None) -> list[np.ndarray]:
        """The method's [seeds, items] table per stratum (the given seeds, default all)."""
        by_seed = self.runs[method]
        chosen = sorted(by_seed) if seeds is None else list(seeds)
        return [np.stack([by_seed[s][t] for s in chosen]) for t in range(len(self.strata))]

    @property
    def weights(self) -> np.ndarray:
        return np.full(len(self.strata), 1 / len(self.strata))


def cells(runs: pd.DataFrame, measure: str) -> dict[tuple[str, float], Cell]:
    """Every (model, sparsity) cell of `runs` (dense and pruned) for `measure`."""
    dense = runs[runs["kind"] == "dense"]
    return {(str(model), float(sparsity)): cell_of(block, dense[dense["model"] == model], measure)
            for (model, sparsity), block in runs[runs["kind"] == "pruned"].groupby(CELL_KEYS, sort=True)}


def cell_of(block: pd.DataFrame, dense: pd.DataFrame, measure: str) -> Cell:
    """The runs of `block` (one model, one sparsity) for `measure`, on the items every one of them and the dense
    reference (the last row of `dense`; accuracy only) scored, aligned by item id."""
    scores = {i: item_scores(row, measure) for i, row in block.iterrows()}
    reference = item_scores(dense.iloc[-1], measure) if measure == ACC and len(dense) else None
    found = [s for s in scores.values() if s is not None] + ([reference] if reference else [])
    cell = Cell(str(block["model"].iloc[0]), float(block["sparsity"].iloc[0]), measure, [], None)
    ids: dict[str, list[Any]] = {}
    if found:
        ids = {t: sorted(set.intersection(*(set(s[t]) for s in found))) for t in set.intersection(*map(set, found))}
        cell.strata = sorted(t for t in ids if ids[t])
    cell.dense = _aligned(reference, cell.strata, ids) if reference and cell.strata else None
    for i, row in block.iterrows():
        if scores[i] is None or not cell.strata:
            cell.missing.add(str(row["method"]))
        else:
            cell.runs.setdefault(str(row["method"]), {})[int(row["seed"])] = _aligned(scores[i], cell.strata, ids)
    return cell


def _aligned(scores: dict[str, dict[Any, float]], strata: list[str], ids: dict[str, list[Any]]) -> list[np.ndarray]:
    """One run's scores as vectors over the cell's shared items, in one order for every run."""
    return [np.array([scores[t][k] for k in ids[t]], dtype=float) for t in strata]


@dataclass(frozen=True)
class Interval:
    """A cell mean as shown (retained % or perplexity) with its 95% interval, standard error on the scale tested
    (retained points, or NLL) and degrees of freedom, over `seeds` seeds."""

    value: float
    low: float
    high: float
    se: float
    df: float
    seeds: int

    @property
    def covers(self) -> str:
        return covers(self.seeds) if self.low == self.low else "–"


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, math.nan, math.nan, 0)


def interval(cell: Cell, method: str, strata: list[int] | None = None, retained: bool = True) -> Interval:
    """`method`'s mean in `cell` with its crossed interval. Accuracy: retained % of dense on the same items (none when
    the dense run stored no item scores), or with `retained=False` the accuracy itself, a fraction as the metric is,
    over the strata given (default all tasks); perplexity: exp(mean NLL)."""
    if method not in cell.runs or method in cell.missing or not cell.strata:
        return NO_INTERVAL
    chosen = list(range(len(cell.strata))) if strata is None else strata
    tables = [cell.matrix(method)[t] for t in chosen]
    w = np.full(len(chosen), 1 / len(chosen))
    seeds = tables[0].shape[0]
    if cell.measure != ACC:
        if not all(np.isfinite(x).all() for x in tables):
            return Interval(math.inf, math.nan, math.nan, math.nan, math.nan, seeds)
        est = crossed(tables, w)
        mean, half = float(est.mean), float(est.half)
        return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), float(est.se), float(est.df),
                        seeds)
    if retained and cell.dense is None:
        return NO_INTERVAL  # the dense reference stored no item scores: retained % has no interval of its own
    if not retained:
        est = crossed(tables, w)
        mean, half = float(est.mean), float(est.half)
        return Interval(mean, mean - half, mean + half, float(est.se), float(est.df), seeds)
    dense = [cell.dense[t] for t in chosen]
    base = float(sum(wt * d.mean() for wt, d in zip(w, dense, strict=True)))
    if base <= 0:
        return NO_INTERVAL
    ratio = float(sum(wt * x.mean() for wt, x in zip(w, tables, strict=True))) / base
    # the ratio linearised on the same items: its spread counts the dense model's item noise too
    est = crossed([(x - ratio * d[None]) * 100 / base for x, d in zip(tables, dense, strict=True)], w)
    half = float(est.half)
    return Interval(100 * ratio, 100 * ratio - half, 100 * ratio + half, float(est.se), float(est.df), seeds)


@dataclass(frozen=True)
class Paired:
    """a − b in a cell, on the seeds both ran and the items every run scored: accuracy points or NLL (nats)."""

    effect: float
    se: float
    df: float
    p: float
    seeds: int


NOT_PAIRED = Paired(math.nan, math.nan, math.nan, math.nan, 0)


def paired(cell: Cell, a: str, b: str) -> Paired:
    """The paired test of `a` against `b` (suite.stats.crossed on the per-item, per-seed differences)."""
    if a not in cell.runs or b not in cell.runs or {a, b} & cell.missing:
        return NOT_PAIRED
    common = sorted(set(cell.runs[a]) & set(cell.runs[b]))
    if not common:
        return NOT_PAIRED
    diff = [x - y for x, y in zip(cell.matrix(a, common), cell.matrix(b, common), strict=True)]
    if not all(np.isfinite(d).all() for d in diff):
        return NOT_PAIRED
    scale = 100 if cell.measure == ACC else 1
    est = crossed([scale * d for d in diff], cell.weights)
    return Paired(float(est.mean), float(est.se), float(est.df), float(est.p), len(common))


def pooled(tests: list[Paired]) -> Paired:
    """One comparison over several cells: the mean of the cells' effects, with the mean of their standard errors (the
    bound that holds however the cells correlate: they share items and calibration draws) and the fewest degrees
    of freedom among them. Conservative by construction."""
    from scipy import stats

    tests = [t for t in tests if t.se == t.se]
    if not tests:
        return NOT_PAIRED
    effect = float(np.mean([t.effect for t in tests]))
    se = float(np.mean([t.se for t in tests]))
    df = float(min(t.df for t in tests))
    p = float(2 * stats.t.sf(abs(effect) / se, df)) if se > 0 else (1.0 if effect == 0 else 0.0)
    return Paired(effect, se, df, p, min(t.seeds for t in tests))


def cell_tests(found: dict[tuple[str, float], Cell], methods: list[str]) -> pd.DataFrame:
    """Every pair of `methods` in every cell both ran: effect (a − b), seeds paired, p and Holm's p over the whole
    family (all cells and pairs of this measure)."""
    rows = []
    for (model, sparsity), cell in found.items():
        present = [m for m in methods if m in cell.runs and m not in cell.missing]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                t = paired(cell, a, b)
                rows.append({"model": model, "sparsity": sparsity, "a": a, "b": b, "seeds": t.seeds,
                             "effect": t.effect, "p": t.p})
    out = pd.DataFrame(rows, columns=["model", "sparsity", "a", "b", "seeds", "effect", "p"])
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float))
    return out


def rank_intervals(found: dict[tuple[str, float], Cell], methods: list[str], draws: int = DRAWS,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """95% rank intervals from a joint bootstrap: in each draw, items are resampled once per stratum (the same draw
    for every method, seed and cell that share the stratum) and seeds once per cell (the same positions for every
    method: the same seeds where methods share them); every method is ranked within each cell and, over the cells
    they all cover, on its mean over cells. Returns (per cell: model, sparsity, method, rank_low, rank_high) and
    (board: method, rank_low, rank_high, draws)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    counts: dict[tuple[str, int], np.ndarray] = {}

    def items(stratum: str, n: int) -> np.ndarray:
        if (stratum, n) not in counts:
            counts[(stratum, n)] = rng.multinomial(n, np.full(n, 1 / n), size=draws).astype(float) / n
        return counts[(stratum, n)]

    per_cell, board_values = [], {}
    for (model, sparsity), cell in found.items():
        present = [m for m in methods if m in cell.runs and m not in cell.missing]
        if not present:
            continue
        positions = rng.random((draws, max(len(cell.runs[m]) for m in present)))
        weights = [items(t, x.shape[1]) for t, x in zip(cell.strata, cell.matrix(present[0]), strict=True)]
        values = {}
        for m in present:
            tables = cell.matrix(m)
            s = tables[0].shape[0]
            pick = np.floor(positions[:, :s] * s).astype(int)
            value = sum(wt * np.take_along_axis(k @ x.T, pick, axis=1).mean(axis=1)
                        for wt, k, x in zip(cell.weights, weights, tables, strict=True))
            if cell.measure == ACC and cell.dense is not None:
                value = 100 * value / sum(wt * (k @ d) for wt, k, d in zip(cell.weights, weights, cell.dense,
                                                                            strict=True))
            values[m] = np.nan_to_num(value, nan=np.inf if cell.measure != ACC else -np.inf)
        sign = 1 if higher_is_better(cell.measure) else -1
        matrix = np.column_stack([values[m] for m in present])
        ranks = stats.rankdata(-sign * matrix, axis=1, method="min")
        low, high = percentile_interval(ranks)
        per_cell += [{"model": model, "sparsity": sparsity, "method": m, "rank_low": int(lo), "rank_high": int(hi)}
                     for m, lo, hi in zip(present, low, high, strict=True)]
        for m in present:
            board_values.setdefault(m, []).append(values[m])
    full = [m for m in methods if len(board_values.get(m, [])) == len(found) and found]
    board = pd.DataFrame(columns=["method", "rank_low", "rank_high"])
    if full:
        sign = 1 if higher_is_better(next(iter(found.values())).measure) else -1
        matrix = np.column_stack([np.mean(board_values[m], axis=0) for m in full])
        low, high = percentile_interval(stats.rankdata(-sign * matrix, axis=1, method="min"))
        board = pd.DataFrame({"method": full, "rank_low": low.astype(int), "rank_high": high.astype(int)})
    return pd.DataFrame(per_cell, columns=["model", "sparsity", "method", "rank_low", "rank_high"]), board


ITEM_COLUMNS = ("ppl.", "acc.", "mean_acc", "retained.mean_acc")  # measured on evaluation items


def column_interval(block: pd.DataFrame, dense: pd.DataFrame, column: str) -> Interval:
    """The mean of `column` over the runs of `block` (one model; its rows the replicates: one method's seeds, or
    an ablation cell's runs) with its interval over those runs and the items, from their stored item scores;
    accuracies as fractions, like the metric. No interval without item scores or across models (never one from
    another unit)."""
    if block["model"].nunique() != 1:
        return NO_INTERVAL
    measure = column if column.startswith("ppl.") else ACC
    rows = block.assign(method="rows", seed=range(len(block)))
    cell = cell_of(rows, dense[dense["model"] == block["model"].iloc[0]], measure)
    if "rows" not in cell.runs or cell.missing:
        return NO_INTERVAL
    if column.startswith("acc."):
        task = column.removeprefix("acc.")
        if task not in cell.strata:
            return NO_INTERVAL
        return interval(cell, "rows", [cell.strata.index(task)], retained=False)
    return interval(cell, "rows", retained=column == "retained.mean_acc")


def rank_text(low: float, high: float) -> str:
    """'2' when the 95% rank interval is one rank, '1–3' otherwise, '–' without one."""
    if low != low:
        return "–"
    return f"{int(low)}" if low == high else f"{int(low)}–{int(high)}"
