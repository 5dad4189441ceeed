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
from suite.stats import ci95

CELL = ["model", "sparsity", "seed"]
BOOTSTRAP = 10_000


SCORE = "retained.mean_acc"  # what a board ranks: mean task accuracy as % of the dense model's, per cell
CELL_KEYS = ["model", "sparsity"]
Z95 = 1.959963984540054


def cell_scores(pruned: pd.DataFrame) -> pd.DataFrame:
    """Per (model, sparsity, method): the runs (n), mean retained accuracy and its 95% half-width, and where that
    width comes from: the t-interval over seeds when there are several, else the items (lm-eval's stderr of the
    mean accuracy, scaled to retained %), else none ('–'). Also how many runs missed their budget."""
    cols = [*CELL_KEYS, "method", "n", "retained_acc_%", "ci95", "ci_from", "missed_budget"]
    if SCORE not in pruned or pruned[SCORE].isna().all():
        return pd.DataFrame(columns=cols)
    pruned = pruned[pruned[SCORE].notna()].assign(_missed=missed_budget(pruned))
    rows = []
    for (model, sparsity, method), runs in pruned.groupby([*CELL_KEYS, "method"], sort=True):
        values = runs[SCORE]
        half, source = ci95(values), "seeds"
        if half != half and "mean_acc_stderr" in runs and runs["mean_acc"].iloc[0]:
            half = Z95 * float(runs["mean_acc_stderr"].iloc[0] / runs["mean_acc"].iloc[0] * values.iloc[0])
            source = "items" if half == half else "–"
        rows.append({"model": model, "sparsity": sparsity, "method": method, "n": len(values),
                     "retained_acc_%": float(values.mean()), "ci95": half, "ci_from": source if half == half else "–",
                     "missed_budget": int(runs["_missed"].sum())})
    return pd.DataFrame(rows, columns=cols)


def rank_bands(means: pd.Series, halves: pd.Series, higher_is_better: bool = True) -> pd.Series:
    """A rank band per method: from 1 + the number of methods surely better (their interval wholly above) to the
    number not surely worse. Overlapping intervals share ranks, exact ties too; a method without an interval is
    its point. '3' when the band is one rank, '2–4' otherwise."""
    sign = 1 if higher_is_better else -1
    mean, half = sign * means.to_numpy(dtype=float), np.nan_to_num(halves.to_numpy(dtype=float))
    low, high = mean - half, mean + half
    out = []
    for i in range(len(mean)):
        best = 1 + int((low > high[i]).sum())
        worst = int((high >= low[i]).sum())
        out.append(str(best) if best == worst else f"{best}–{worst}")
    return pd.Series(out, index=means.index)


def ranking(pruned: pd.DataFrame) -> pd.DataFrame:
    """Methods ranked on the cells (model, sparsity) they all cover: each method's score is the mean over those
    cells of its cell mean (every cell weighs the same, whatever its number of seeds), with a 95% half-width
    combined from the cells'; overlapping intervals share a rank band. A method that misses a cell of the board is
    not averaged over the others: it is listed after the ranked ones with its coverage and no rank (its cells are
    in `cell_scores`)."""
    cols = ["rank", "method", "retained_acc_%", "ci95", "cells", "runs", "missed_budget"]
    scores = cell_scores(pruned)
    if scores.empty:
        return pd.DataFrame(columns=cols)
    cells = scores.groupby(CELL_KEYS).ngroups
    per = scores.groupby("method")
    covered = per.size()
    full = scores[scores["method"].isin(covered[covered == cells].index)]
    rows = []
    for method, block in full.groupby("method"):
        k = len(block)
        rows.append({"method": method, "retained_acc_%": block["retained_acc_%"].mean(),
                     "ci95": float(np.sqrt((block["ci95"] ** 2).sum(skipna=False)) / k), "cells": f"{k}/{cells}",
                     "runs": int(block["n"].sum()), "missed_budget": int(block["missed_budget"].sum())})
    ranked = pd.DataFrame(rows, columns=cols[1:])
    higher = metric(SCORE).higher_is_better is not False
    ranked = ranked.sort_values(["retained_acc_%", "method"], ascending=[not higher, True], ignore_index=True)
    ranked.insert(0, "rank", rank_bands(ranked["retained_acc_%"], ranked["ci95"], higher))
    partial = [{"rank": "–", "method": m, "retained_acc_%": np.nan, "ci95": np.nan,
                "cells": f"{covered[m]}/{cells}", "runs": int(per.get_group(m)["n"].sum()),
                "missed_budget": int(per.get_group(m)["missed_budget"].sum())}
               for m in sorted(covered[covered < cells].index)]
    return pd.concat([ranked, pd.DataFrame(partial, columns=cols)], ignore_index=True) if partial else ranked


def interval_text(mean: float, half: float) -> str:
    """'mean ± half' (2 decimals), the mean alone without an interval, '–' without a mean."""
    if mean != mean:
        return "–"
    return f"{mean:.2f}" + (f" ± {half:.2f}" if half == half else "")


def ranked_cells(scores: pd.DataFrame) -> pd.DataFrame:
    """`cell_scores` with each method's rank band within its (model, sparsity) cell, best first in every cell."""
    if scores.empty:
        return scores.assign(rank=pd.Series(dtype=str))
    order = scores.sort_values([*CELL_KEYS, "retained_acc_%", "method"], ascending=[True, True, False, True])
    bands = [rank_bands(block["retained_acc_%"], block["ci95"]) for _, block in order.groupby(CELL_KEYS, sort=False)]
    return order.assign(rank=pd.concat(bands)).reset_index(drop=True)


def best_per_cell(pruned: pd.DataFrame) -> pd.DataFrame:
    """Per (model, sparsity): the method with the best mean retained accuracy, with its interval and n, and the
    methods whose rank band also includes 1 (not distinguishable from it at 95%)."""
    cols = ["model", "sparsity", "best", "retained acc %", "n", "also rank 1 within the intervals"]
    rows = []
    for (model, sparsity), block in ranked_cells(cell_scores(pruned)).groupby(CELL_KEYS, sort=False):
        top = block.iloc[0]
        tied = [m for m, band in zip(block["method"].iloc[1:], block["rank"].iloc[1:], strict=True)
                if band.split("–")[0] == "1"]
        rows.append({"model": model, "sparsity": sparsity, "best": top["method"],
                     "retained acc %": interval_text(top["retained_acc_%"], top["ci95"]), "n": int(top["n"]),
                     "also rank 1 within the intervals": ", ".join(tied) or "–"})
    return pd.DataFrame(rows, columns=cols)


def coverage(pruned: pd.DataFrame) -> pd.DataFrame:
    """Method x cell: the number of runs (seeds), 0 where the method never ran there."""
    if pruned.empty:
        return pd.DataFrame()
    table = pruned.pivot_table(index="method", columns=CELL_KEYS, values="seed", aggfunc="count", fill_value=0)
    table.columns = [f"{m} @ {s:g}" for m, s in table.columns]
    return table.astype(int)


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


def p_text(p: float, draws: int | None = None) -> str:
    """A p-value at its resolution: a bootstrap of B draws cannot tell p below 1/B, so its 0 reads '< 1/B'."""
    if p != p:
        return "–"
    if draws and p < 1 / draws:
        return f"< {1 / draws:.0e}"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def significance_display(sig: pd.DataFrame) -> pd.DataFrame:
    """The pairwise tests as read: the effect in accuracy points, p-values at their resolution, '–' untested."""
    out = sig[["a", "b", "pairs"]].copy()
    out["effect (acc points, a - b)"] = [f"{100 * d:+.2f}" if d == d else "–" for d in sig["mean_diff_acc"]]
    out["p bootstrap"] = [p_text(p, BOOTSTRAP) for p in sig["p_bootstrap"]]
    out["p Wilcoxon"] = [p_text(p) for p in sig["p_wilcoxon"]]
    out["p Wilcoxon, Holm"] = [p_text(p) for p in sig["p_wilcoxon_holm"]]
    return out


def matrix(sig: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Method x method: the row's mean accuracy minus the column's, in points over their matched pairs, and the
    Holm-corrected Wilcoxon p; '*' where that p is below 0.05."""
    out = pd.DataFrame("–", index=pd.Index(order, name="row − column"), columns=order)
    for _, r in sig.iterrows():
        if r["mean_diff_acc"] != r["mean_diff_acc"]:
            continue
        star = "*" if r["p_wilcoxon_holm"] < 0.05 else ""
        p = p_text(r["p_wilcoxon_holm"])
        out.loc[r["a"], r["b"]] = f"{100 * r['mean_diff_acc']:+.1f} (p {p}){star}"
        out.loc[r["b"], r["a"]] = f"{-100 * r['mean_diff_acc']:+.1f} (p {p}){star}"
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
