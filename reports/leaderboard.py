"""Leaderboard: methods ranked by mean retained accuracy, a win-rate matrix, and paired significance tests.

Pairs are matched on (model, sparsity, seed) — and on task for the significance tests — so two methods are only
compared where both ran; a method missing from a cell is not punished or rewarded for it.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from reports.tables import RELAXED, missed_budget
from suite.run.record import metric

CELL = ["model", "sparsity", "seed"]
BOOTSTRAP = 10_000


def ranking(pruned: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean retained accuracy (% of dense) over every run, its spread, the number of runs, and how many
    of them are projection results (a mask learner whose relaxation missed its budget; `missed_runs` names them)."""
    if "retained.mean_acc" not in pruned or pruned["retained.mean_acc"].isna().all():
        return pd.DataFrame(columns=["rank", "method", "retained_acc_%", "std", "runs", "missed_budget"])
    g = pruned.groupby("method")["retained.mean_acc"]
    missed = missed_budget(pruned).groupby(pruned["method"]).sum()
    out = pd.DataFrame({"retained_acc_%": g.mean(), "std": g.std(ddof=1), "runs": g.count(),
                        "missed_budget": missed.reindex(g.mean().index, fill_value=0).astype(int)})
    best_first = not metric("retained.mean_acc").higher_is_better  # the metric's registered direction
    out = out.sort_values("retained_acc_%", ascending=best_first).reset_index()
    out.insert(0, "rank", range(1, len(out) + 1))
    return out


def missed_runs(pruned: pd.DataFrame) -> pd.DataFrame:
    """The runs whose relaxation ended more than 2 points from the target: method, model, sparsity, seed, relaxed."""
    cols = ["method", "model", "sparsity", "seed", RELAXED]
    if RELAXED not in pruned:
        return pd.DataFrame(columns=cols)
    return pruned.loc[missed_budget(pruned), cols].rename(columns={RELAXED: "relaxed_sparsity"}).reset_index(drop=True)


def win_rate(pruned: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Share of shared (model, sparsity, seed) cells where the row method's mean accuracy beats the column's."""
    table = pruned.pivot_table(index=CELL, columns="method", values="mean_acc")
    out = pd.DataFrame(np.nan, index=order, columns=order)
    for a in order:
        for b in order:
            if a == b or a not in table or b not in table:
                continue
            both = table[[a, b]].dropna()
            if len(both):
                out.loc[a, b] = float(((both[a] > both[b]) + 0.5 * (both[a] == both[b])).mean())
    return out


def paired_samples(pruned: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Accuracy differences a - b over matched (model, sparsity, seed, task) pairs."""
    tasks = [c for c in pruned.columns if c.startswith("acc.")]
    long = pruned.melt(id_vars=[*CELL, "method"], value_vars=tasks, var_name="task", value_name="acc").dropna()
    wide = long.pivot_table(index=[*CELL, "task"], columns="method", values="acc")
    if a not in wide or b not in wide:
        return np.array([])
    both = wide[[a, b]].dropna()
    return (both[a] - both[b]).to_numpy()


def bootstrap_p(diff: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired-bootstrap p-value of mean(diff) = 0 (resampling pairs, seeded)."""
    if len(diff) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


EXACT_WILCOXON = 16  # pairs (zeros dropped) up to which every sign flip is enumerated: 2^16 x 16 ranks


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p: zero differences dropped, tied |d| share their mean rank.

    Task accuracies on a few hundred items tie often, and with ties scipy's `auto` falls back to its generic
    permutation test, about 0.5 s a pair (most of a quickstart report's time); the same exact null distribution is
    one matrix product over all 2^n sign flips. Beyond EXACT_WILCOXON pairs, scipy's normal approximation."""
    from scipy import stats

    if len(diff) == 0:
        return float("nan")
    d = diff[diff != 0]
    if len(d) == 0:
        return 1.0
    if len(d) > EXACT_WILCOXON:
        return float(stats.wilcoxon(d, method="approx").pvalue)
    ranks = stats.rankdata(np.abs(d))
    flips = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
    observed = abs(float(np.sign(d) @ ranks))
    return float((np.abs(flips @ ranks) >= observed - 1e-9).mean())


def significance(pruned: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Every pair of methods: paired accuracy differences, their bootstrap and Wilcoxon p-values, and the Wilcoxon
    p-values corrected for the number of pairs tested (Holm): with 11 methods, 55 tests at alpha 0.05 would give
    about three false wins by chance uncorrected."""
    rows = []
    for a, b in combinations(order, 2):
        diff = paired_samples(pruned, a, b)
        rows.append({"a": a, "b": b, "pairs": len(diff), "mean_diff_acc": float(diff.mean()) if len(diff) else np.nan,
                     "p_bootstrap": bootstrap_p(diff), "p_wilcoxon": wilcoxon_p(diff)})
    out = pd.DataFrame(rows, columns=["a", "b", "pairs", "mean_diff_acc", "p_bootstrap", "p_wilcoxon"])
    out["p_wilcoxon_holm"] = holm(out["p_wilcoxon"].to_numpy(dtype=float))
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN: not tested, left out of the family): the k-th
    smallest of m is multiplied by m - k + 1, made monotone from the smallest up, and capped at 1."""
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def plot_win_rate(matrix: pd.DataFrame, stem: Path) -> Path:
    from reports.plots import figure, save

    n = len(matrix)
    fig, (ax,) = figure(width=1.6 + 0.75 * n, height=1.0 + 0.6 * n)
    im = ax.imshow(matrix.to_numpy(dtype=float), cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks(range(n), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.index)
    for i in range(n):
        for j in range(n):
            v = matrix.iat[i, j]
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("win rate (row beats column)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, stem)
