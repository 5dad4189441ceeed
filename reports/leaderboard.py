"""Leaderboard: methods ranked by retained accuracy, with 95% intervals over seeds and items, 95% rank intervals,
paired tests on the same items and seeds, and a win-rate matrix.

Every number comes from `reports.uncertainty` (the runs' stored item scores): a cell's interval covers its seeds
(each with its own calibration draw) and its evaluation items; a comparison is paired on the seeds both methods ran
and the items every run scored; a rank interval is where the method ranked in 95% of a joint bootstrap of seeds and
items. A method missing from a cell is not punished or rewarded for it: rankings use the cells every ranked method
covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reports import uncertainty as u
from reports.tables import RELAXED, missed_budget
from suite.stats import holm

CELL = ["model", "sparsity", "seed"]
SCORE = "retained.mean_acc"  # what a board ranks: mean task accuracy as % of the dense model's, per cell
CELL_KEYS = u.CELL_KEYS
SIGNIFICANT = 0.05
TIED = "tied set (no Holm-significant difference from the highest)"


def cell_scores(runs: pd.DataFrame, ranks: bool = True) -> pd.DataFrame:
    """Per (model, sparsity, method), best first in each cell: the seeds (n), retained accuracy with its 95% interval
    and what it covers, perplexity (the first spec) with its interval, the 95% rank interval of each within the
    cell, and how many runs missed their budget or are broken. `runs`: pruned runs and their dense references."""
    cols = [*CELL_KEYS, "rank", "method", "n", "retained_acc_%", "ci95", "ci_from", "ppl", "ppl_low", "ppl_high",
            "ppl_rank", "missed_budget", "broken"]
    pruned = runs[runs["kind"] == "pruned"]
    if SCORE not in pruned or pruned[SCORE].isna().all():
        return pd.DataFrame(columns=cols)
    pruned = pruned[pruned[SCORE].notna()]
    runs = pd.concat([runs[runs["kind"] == "dense"], pruned])
    flags = pruned.assign(_missed=missed_budget(pruned), _broken=u.broken(pruned))
    methods = sorted(pruned["method"].unique())
    acc = u.cells(runs, u.ACC)
    ppl_measure = next((m for m in u.measures(runs) if m != u.ACC), None)
    ppl = u.cells(runs, ppl_measure) if ppl_measure else {}
    acc_ranks = _rank_lookup(u.rank_intervals(acc, methods)[0]) if ranks else {}
    ppl_ranks = _rank_lookup(u.rank_intervals(ppl, methods)[0]) if ranks and ppl else {}
    rows = []
    for (model, sparsity, method), block in flags.groupby([*CELL_KEYS, "method"], sort=True):
        key = (str(model), float(sparsity))
        a = u.interval(acc[key], method) if key in acc else u.NO_INTERVAL
        q = u.interval(ppl[key], method) if key in ppl else u.NO_INTERVAL
        value = a.value if a.value == a.value else float(block[SCORE].mean())
        rows.append({"model": model, "sparsity": sparsity, "method": method, "n": len(block),
                     "retained_acc_%": value, "ci95": a.value - a.low, "ci_from": a.covers,
                     "ppl": q.value if q.value == q.value else _first_ppl(block), "ppl_low": q.low,
                     "ppl_high": q.high, "rank": acc_ranks.get((*key, method), "–"),
                     "ppl_rank": ppl_ranks.get((*key, method), "–"), "missed_budget": int(block["_missed"].sum()),
                     "broken": int(block["_broken"].sum())})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values([*CELL_KEYS, "retained_acc_%", "method"], ascending=[True, True, False, True],
                           ignore_index=True)


def _rank_lookup(frame: pd.DataFrame) -> dict[tuple[str, float, str], str]:
    return {(r.model, float(r.sparsity), r.method): u.rank_text(r.rank_low, r.rank_high)
            for r in frame.itertuples(index=False)}


def _first_ppl(block: pd.DataFrame) -> float:
    columns = sorted(c for c in block.columns if c.startswith("ppl.") and block[c].notna().any())
    return float(np.exp(np.log(block[columns[0]]).mean())) if columns else np.nan


def ranking(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods ranked on the (model, sparsity) cells they all cover: each method's score is the mean over those cells
    of its cell mean (every cell weighs the same, whatever its number of seeds). Its ± is the mean of the cells'
    half-widths, the bound that holds however the cells correlate (they share items and calibration draws); its rank
    is the 95% rank interval of the joint bootstrap. A method that misses a cell is listed after the ranked ones
    with its coverage and no rank (its cells are in `cell_scores`)."""
    cols = ["rank", "method", "retained_acc_%", "ci95", "cells", "runs", "missed_budget", "broken"]
    scores = cell_scores(runs, ranks=False)
    if scores.empty:
        return pd.DataFrame(columns=cols)
    cells = scores.groupby(CELL_KEYS).ngroups
    per = scores.groupby("method")
    covered = per.size()
    full = scores[scores["method"].isin(covered[covered == cells].index)]
    rows = []
    for method, block in full.groupby("method"):
        rows.append({"method": method, "retained_acc_%": block["retained_acc_%"].mean(),
                     "ci95": float(block["ci95"].mean(skipna=False)), "cells": f"{len(block)}/{cells}",
                     "runs": int(block["n"].sum()), "missed_budget": int(block["missed_budget"].sum()),
                     "broken": int(block["broken"].sum())})
    ranked = pd.DataFrame(rows, columns=cols[1:])
    ranked = ranked.sort_values(["retained_acc_%", "method"], ascending=[False, True], ignore_index=True)
    pruned = runs[(runs["kind"] == "pruned") & runs[SCORE].notna()]
    board = u.rank_intervals(u.cells(pd.concat([runs[runs["kind"] == "dense"], pruned]), u.ACC),
                             list(ranked["method"]))[1].set_index("method")
    ranked.insert(0, "rank", [u.rank_text(*board.loc[m, ["rank_low", "rank_high"]]) if m in board.index else "–"
                              for m in ranked["method"]])
    partial = [{"rank": "–", "method": m, "retained_acc_%": np.nan, "ci95": np.nan,
                "cells": f"{covered[m]}/{cells}", "runs": int(per.get_group(m)["n"].sum()),
                "missed_budget": int(per.get_group(m)["missed_budget"].sum()),
                "broken": int(per.get_group(m)["broken"].sum())}
               for m in sorted(covered[covered < cells].index)]
    return pd.concat([ranked, pd.DataFrame(partial, columns=cols)], ignore_index=True) if partial else ranked


def interval_text(mean: float, half: float) -> str:
    """'mean ± half' (2 decimals), the mean alone without an interval, '–' without a mean."""
    if mean != mean:
        return "–"
    return f"{mean:.2f}" + (f" ± {half:.2f}" if half == half else "")


def ppl_text(value: float, low: float, high: float) -> str:
    """A perplexity and its 95% interval (asymmetric: it is exp of an interval on the NLL)."""
    if value != value:
        return "–"
    text = f"{value:.4g}"
    return text if low != low else f"{text} [{low:.4g}, {high:.4g}]"


def best_per_cell(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, sparsity): the best method by retained accuracy only where its paired test against the runner-up
    is significant after Holm's correction (over every pair of every cell); otherwise "no separation" and the tied
    set (the highest, and every method it is not significantly better than); the numbers are the highest's. A
    broken model (perplexity above its vocabulary size) is never named best."""
    cols = ["model", "sparsity", "best", "retained acc %", "ppl", "n", "covers", TIED]
    scores = cell_scores(runs, ranks=False)
    if scores.empty:
        return pd.DataFrame(columns=cols)
    tests = cell_significance(runs, u.ACC)
    rows = []
    for (model, sparsity), block in scores.groupby(CELL_KEYS, sort=False):
        healthy = block[block["broken"] == 0]
        if healthy.empty:
            rows.append({"model": model, "sparsity": sparsity, "best": "none: every model broken",
                         "retained acc %": "–", "ppl": "–", "n": 0, "covers": "–", TIED: "–"})
            continue
        top = healthy.iloc[0]
        here = tests[(tests["model"] == model) & (tests["sparsity"] == sparsity)]
        others = list(healthy["method"].iloc[1:])
        separated = not others or _separated(here, top["method"], others[0])
        tied = [top["method"]] + [m for m in others if not _separated(here, top["method"], m)]
        rows.append({"model": model, "sparsity": sparsity, "best": top["method"] if separated else "no separation",
                     "retained acc %": interval_text(top["retained_acc_%"], top["ci95"]),
                     "ppl": ppl_text(top["ppl"], top["ppl_low"], top["ppl_high"]), "n": int(top["n"]),
                     "covers": top["ci_from"], TIED: "–" if separated else ", ".join(tied)})
    return pd.DataFrame(rows, columns=cols)


def _separated(tests: pd.DataFrame, a: str, b: str) -> bool:
    """Is `a` significantly better than `b` in these tests (Holm p below 0.05, effect in a's favour)?"""
    row = tests[((tests["a"] == a) & (tests["b"] == b)) | ((tests["a"] == b) & (tests["b"] == a))]
    if row.empty or row["p_holm"].iloc[0] != row["p_holm"].iloc[0]:
        return False
    effect = row["effect"].iloc[0] * (1 if row["a"].iloc[0] == a else -1)
    return bool(row["p_holm"].iloc[0] < SIGNIFICANT and effect > 0)


def cell_significance_by_measure(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """`cell_significance` for every measure the runs have (accuracy, each perplexity), each its own Holm family."""
    return [(measure, cell_significance(runs, measure)) for measure in u.measures(runs)]


def cell_significance(runs: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Every pair of methods in every cell, paired on seeds and items (`measure`: accuracy points, or NLL in nats
    for a perplexity), with Holm's p over all of them."""
    pruned = runs[runs["kind"] == "pruned"]
    methods = sorted(pruned["method"].unique())
    return u.cell_tests(u.cells(runs, measure), methods)

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


def significance(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Every pair of `order`, pooled over the cells both ran (`reports.uncertainty.pooled`: the mean of the cells'
    paired effects, conservative in its standard error): effect in accuracy points, cells, seeds paired, p, and
    Holm's p over all pairs (with 11 methods, 55 tests at alpha 0.05 would give about three false wins by chance
    uncorrected)."""
    found = u.cells(runs, u.ACC)
    rows = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            tests = [u.paired(cell, a, b) for cell in found.values()]
            tests = [t for t in tests if t.se == t.se]
            t = u.pooled(tests)
            rows.append({"a": a, "b": b, "cells": len(tests), "seeds": t.seeds, "mean_diff_acc": t.effect / 100,
                         "p": t.p})
    out = pd.DataFrame(rows, columns=["a", "b", "cells", "seeds", "mean_diff_acc", "p"])
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float))
    return out


def p_text(p: float) -> str:
    if p != p:
        return "–"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def significance_display(sig: pd.DataFrame) -> pd.DataFrame:
    """The pairwise tests as read: the effect in accuracy points, Holm-corrected p only, '–' untested."""
    out = sig[["a", "b", "cells", "seeds"]].copy()
    out["effect (acc points, a - b)"] = [f"{100 * d:+.2f}" if d == d else "–" for d in sig["mean_diff_acc"]]
    out["p, Holm-corrected"] = [p_text(p) for p in sig["p_holm"]]
    return out


def cell_significance_display(tests: pd.DataFrame, measure: str) -> pd.DataFrame:
    """A cell's tests as read: effect (accuracy points or NLL), seeds paired, Holm's p."""
    unit = "acc points" if measure == u.ACC else "NLL, nats"
    out = tests[["model", "sparsity", "a", "b", "seeds"]].copy()
    out[f"effect ({unit}, a - b)"] = [f"{d:+.3f}" if d == d else "–" for d in tests["effect"]]
    out["p, Holm-corrected"] = [p_text(p) for p in tests["p_holm"]]
    return out


def matrix(sig: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Method x method: the row's mean accuracy minus the column's, in points, pooled over the cells both ran, and the
    Holm-corrected p; '*' where that p is below 0.05."""
    out = pd.DataFrame("–", index=pd.Index(order, name="row − column"), columns=order)
    for _, r in sig.iterrows():
        if r["mean_diff_acc"] != r["mean_diff_acc"]:
            continue
        star = "*" if r["p_holm"] < SIGNIFICANT else ""
        p = p_text(r["p_holm"])
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
