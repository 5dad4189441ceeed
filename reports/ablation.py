"""The ablation view: a method swept over a params grid, each metric against each knob's values.

A grid variant's runs carry its knobs in `sweep` (JSON) and their values in `hp.<knob>`; the variants of one grid
share a base label (`ddp` for `ddp[forward_map=identity,mu_end=20]`). Per knob, the other knobs are either
marginalised (their runs pooled: the knob's average effect) or held (one row per combination of their values: the
knob's effect at each of them), as the user chooses. Every cell is a mean with its 95% interval over the runs in
it and their count (perplexity and accuracies over those runs and the evaluation items, `reports.uncertainty`; one
run: the items only); a cell holding a run whose relaxation missed its budget is marked †, so a knob's apparent effect
that is really the exact-budget projection's is never read as the method's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from reports import uncertainty
from reports.tables import RELAXED, label, missed_budget
from suite.stats import ci95

MODES = ("marginal", "held")


def swept(runs: pd.DataFrame) -> dict[str, tuple[list[str], pd.DataFrame]]:
    """Base label -> (its knobs, its variants' pruned runs), for every grid in `runs`."""
    if "sweep" not in runs:
        return {}
    pruned = runs[(runs["kind"] == "pruned") & runs["sweep"].fillna("").astype(bool)].copy()
    if pruned.empty:
        return {}
    pruned = pruned.sort_values("start_time")  # categorical values then keep the grid's order
    pruned["base"] = pruned["method"].str.split("[", n=1, regex=False).str[0]
    pruned["missed"] = missed_budget(pruned)
    out = {}
    for base, block in pruned.groupby("base", sort=True):
        records = [json.loads(text) for text in block["sweep"]]
        knobs = sorted({k for record in records for k in record})
        for knob in knobs:  # the knob's value as the grid wrote it, from the sweep record
            block[f"knob.{knob}"] = [_hashable(record.get(knob)) for record in records]
        out[str(base)] = (knobs, block)
    return out


def _hashable(value: object) -> object:
    return json.dumps(value) if isinstance(value, list | dict) else value


def metrics(runs: pd.DataFrame) -> list[str]:
    """What an ablation shows: the first perplexity, mean accuracy, retained %, and the relaxed sparsity."""
    ppl = sorted(c for c in runs.columns if c.startswith("ppl."))[:1]
    return [c for c in [*ppl, "mean_acc", "retained.mean_acc", RELAXED] if c in runs and runs[c].notna().any()]


def _ordered(values: pd.Series) -> list[object]:
    """Numbers ascending; anything else in the order the runs met them (the grid's)."""
    unique = list(dict.fromkeys(values))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in unique)
    return sorted(unique) if numeric else unique


def knob_table(block: pd.DataFrame, knobs: list[str], knob: str, columns: list[str], mode: str,
               dense: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows: sparsity, (held: the other knobs' values), this knob's value; per metric its mean, 95% half-width and
    n, and how many of the cell's runs missed their budget. `dense`: the dense references (retained % on items)."""
    held = [f"knob.{k}" for k in knobs if k != knob] if mode == "held" else []
    keys = ["sparsity", *held, f"knob.{knob}"]
    rows = []
    for values, cell in block.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, values, strict=True))
        for c in columns:
            mean, half = summary(cell, c, dense)
            row |= {c: mean, f"{c}.ci95": half, f"{c}.n": int(cell[c].notna().sum())}
        rows.append(row | {"missed_budget": int(cell["missed"].sum())})
    out = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(_ordered(block[f"knob.{knob}"]))}
    out["_order"] = out[f"knob.{knob}"].map(order)
    return out.sort_values(["sparsity", *held, "_order"]).drop(columns="_order").reset_index(drop=True)


def interaction(block: pd.DataFrame, a: str, b: str, column: str,
                dense: pd.DataFrame | None = None) -> dict[float, pd.DataFrame]:
    """Per sparsity, knob a's values x knob b's values: 'mean ± ci (n)' of `column` over the runs in each cell
    (the other knobs pooled), † where a run of the cell missed its budget."""
    out = {}
    for sparsity, at in block.groupby("sparsity"):
        rows, cols = _ordered(at[f"knob.{a}"]), _ordered(at[f"knob.{b}"])
        table = pd.DataFrame("–", index=pd.Index(rows, name=a), columns=pd.Index(cols, name=b))
        for (va, vb), cell in at.groupby([f"knob.{a}", f"knob.{b}"]):
            table.loc[va, vb] = cell_text(column, cell, int(cell["missed"].sum()), dense)
        out[float(sparsity)] = table
    return out


def summary(cell: pd.DataFrame, column: str, dense: pd.DataFrame | None) -> tuple[float, float]:
    """A cell's mean and 95% half-width: over its runs and the evaluation items for a perplexity or an accuracy
    (a perplexity's half-width is the mean of its asymmetric interval's two sides), over its runs otherwise."""
    values = cell[column].dropna()
    if not column.startswith(uncertainty.ITEM_COLUMNS):
        return (float(values.mean()) if len(values) else np.nan), ci95(values)
    found = uncertainty.column_interval(cell, dense if dense is not None else cell.iloc[:0], column)
    mean = found.value if found.value == found.value else (float(values.mean()) if len(values) else np.nan)
    return mean, (found.high - found.low) / 2


def cell_text(column: str, cell: pd.DataFrame, missed: int = 0, dense: pd.DataFrame | None = None) -> str:
    mean, half = summary(cell, column, dense)
    return fmt(column, mean, half, int(cell[column].notna().sum())) + (" †" if missed else "")


def fmt(column: str, mean: float, half: float, n: int) -> str:
    """'mean ± half (n=..)' in the metric's units (accuracy in %), '–' for no value."""
    if mean != mean:
        return "–"
    scale = 100 if column.startswith(("acc.", "mean_acc")) else 1
    digits = 3 if column == RELAXED else 2 if scale == 1 else 1
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * half:.{digits}f}" if half == half else "") + f" (n={n})"


def display(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """A knob table with 'mean ± ci (n)' cells and the metrics' labels, for HTML and Markdown."""
    keys = [c for c in table.columns if c == "sparsity" or c.startswith("knob.")]
    out = table[keys].rename(columns=lambda c: c.removeprefix("knob."))
    for c in columns:
        out[label(c)] = [fmt(c, r[c], r[f"{c}.ci95"], int(r[f"{c}.n"])) for _, r in table.iterrows()]
    out["missed budget"] = [f"{m} †" if m else "0" for m in table["missed_budget"]]
    return out


def plot_knob(table: pd.DataFrame, knob: str, columns: list[str], stem: Path, title: str) -> Path:
    """One panel per metric: the metric against the knob's values (mean and 95% CI), one line per sparsity (and,
    held, per combination of the other knobs); missed-budget points hollow."""
    from reports.plots import figure, log_axis, outside_legend, save, style

    fig, axes = figure(len(columns), width=3.6, height=3.0)
    values = list(dict.fromkeys(table[f"knob.{knob}"]))
    x = {v: i for i, v in enumerate(values)}
    lines = [c for c in table.columns if c == "sparsity" or (c.startswith("knob.") and c != f"knob.{knob}")]
    for ax, column in zip(axes, columns, strict=True):
        for i, (key, rows) in enumerate(table.groupby(lines, sort=False)):
            key = key if isinstance(key, tuple) else (key,)
            name = ", ".join(f"{c.removeprefix('knob.')}={v}" for c, v in zip(lines, key, strict=True))
            color, marker = style(i)
            xs = np.array([x[v] for v in rows[f"knob.{knob}"]], dtype=float)
            ax.errorbar(xs, rows[column], yerr=rows[f"{column}.ci95"].fillna(0), color=color, marker=marker,
                        capsize=3, label=name)
            missed = (rows["missed_budget"] > 0).to_numpy()
            ax.scatter(xs[missed], rows.loc[missed, column], s=90, facecolors="none", edgecolors="red", zorder=3)
            if column == RELAXED:
                ax.axhline(rows["sparsity"].iloc[0], color=color, ls=":", lw=1)
        ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=30 if len(values) > 4 else 0)
        ax.set(xlabel=knob, ylabel=label(column))
        if column.startswith("ppl."):
            log_axis(ax)
    outside_legend(axes[-1], title="red ring: missed budget\ndotted: target", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save(fig, stem)
