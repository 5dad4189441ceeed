"""Per-model results tables: method x sparsity, mean +- 95% CI over seeds, best per column in bold.

One summary (numbers) renders to Markdown, LaTeX (booktabs), HTML and CSV, so the formats never disagree.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd

from reports import uncertainty
from reports.query import STAGES
from suite.run.record import MISS_TOLERANCE, metric
from suite.stats import ci95

SPEED = "speed.prefill_speedup"
RELAXED = "diag_relaxed_sparsity"
FIXED = ["mean_acc", "retained.mean_acc", "params_compact", RELAXED, SPEED, "prune_seconds"]
MISS_NOTE = ("† the method's relaxation missed the target by more than 2 points of sparsity (relaxed sp.): the "
             "exact-budget projection decided the rest of the budget, so the row measures the projection as much as "
             "the method.")
INTERVAL_NOTE = ("Perplexities and accuracies: mean and 95% interval over seeds and evaluation items together "
                 "(documents, windows), each seed with its own calibration draw; a row of one seed covers the items "
                 "only. Perplexity is exp of the mean token NLL, its interval exp of the NLL's. Other columns: the "
                 "t-interval over seeds.")
NONFINITE_NOTE = ("‡ a run's metric was not finite (inf or nan: the loss diverged); it is recorded as such, and a mean "
                  "that includes it is inf or nan.")


def missed_budget(runs: pd.DataFrame) -> pd.Series:
    """Per run: did a mask learner's relaxation end more than MISS_TOLERANCE from its target sparsity?"""
    if RELAXED not in runs:
        return pd.Series(False, index=runs.index)
    return (runs[RELAXED] - runs["sparsity"]).abs() > MISS_TOLERANCE


def columns(df: pd.DataFrame) -> list[str]:
    """Perplexities, each task's accuracy, then the fixed columns, as far as the runs recorded them."""
    ppl = sorted(c for c in df.columns if c.startswith("ppl."))
    acc = sorted(c for c in df.columns if c.startswith("acc."))
    return [c for c in ppl + acc + FIXED if c in df.columns and df[c].notna().any()]


def better(column: str) -> int:
    """+1 higher is better, -1 lower is better, 0 not ranked (the metric's registered direction)."""
    higher = metric(column).higher_is_better
    return 0 if higher is None else 1 if higher else -1


def label(column: str) -> str:
    return metric(column).label


@dataclass
class Summary:
    """Numbers of one model's table: a row per (method, sparsity), with mean, CI and seed count per column."""

    model: str
    columns: list[str]
    frame: pd.DataFrame  # index (method, sparsity); columns (column, 'mean'|'low'|'high'|'n')
    seeds: pd.Series  # index (method, sparsity): the runs (seeds) of each row
    missed: frozenset[tuple[str, float]] = frozenset()  # (method, sparsity) rows with a run that missed its budget
    nonfinite: frozenset[tuple[str, float]] = frozenset()  # (method, sparsity) rows with a non-finite metric
    broken: frozenset[tuple[str, float]] = frozenset()  # (method, sparsity) rows with a broken model

    def notes(self) -> list[str]:
        return [INTERVAL_NOTE] + [n for n, rows in ((MISS_NOTE, self.missed), (NONFINITE_NOTE, self.nonfinite),
                                                    (uncertainty.BROKEN_NOTE, self.broken)) if rows]

    def best(self) -> set[tuple[int, str]]:
        """(row position, column) pairs to bold: best pruned mean per column within each sparsity."""
        out = set()
        rows = self.frame.reset_index()
        for column in self.columns:
            sign = better(column)
            if sign == 0:
                continue
            for _, block in rows[rows["method"] != "dense"].groupby("sparsity"):
                values = block[(column, "mean")].dropna()
                if len(values) > 1:
                    target = values.max() if sign > 0 else values.min()
                    out |= {(int(i), column) for i in values.index[values == target]}
        return out


def both_stages(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """LLM-Pruner's layout: each run with a recovery stage twice, as `method (w/o tune)` with its pruned numbers and
    `method (w/ tune)` with its recovered ones (the dense reference stays one row), and the row order that puts a
    method's two rows one after the other. Empty when no run has a recovery stage."""
    recovered = runs["recovery"].fillna("").astype(bool) if "recovery" in runs else pd.Series(False, runs.index)
    if not recovered.any():
        return runs.iloc[:0], []
    rows = [runs[runs["kind"] == "dense"]]
    for stage, words in STAGES.items():
        block = runs[recovered].copy()
        block["items_stage"] = stage  # the intervals read that stage's stored item scores
        for column in [c for c in block.columns if c.startswith(f"{stage}.")]:
            block[column.removeprefix(f"{stage}.")] = block[column]
        block["method"] = block["method"] + f" ({words})"
        rows.append(block)
    order = [f"{m} ({words})" for m in sorted(runs.loc[recovered, "method"].unique()) for words in STAGES.values()]
    return pd.concat(rows), order


LEAD = 3  # method, sparsity, seeds: the text columns before the numbers


def summarize(df: pd.DataFrame, model: str, methods: list[str] | None = None) -> Summary:
    """`model`'s table: dense first, then by sparsity, methods alphabetically or in the order `methods` gives.

    Perplexities and accuracies carry their interval over seeds and evaluation items (`reports.uncertainty`), every
    other column (prune time, sparsity, speed: one number per run) the t-interval over seeds."""
    runs = df[df["model"] == model]
    cols = columns(runs)
    grouped = runs.groupby(["method", "sparsity"], sort=False)[cols]
    mean, half = grouped.mean(), grouped.agg(ci95)
    parts = {"mean": mean, "low": mean - half, "high": mean + half, "n": grouped.count()}
    seeds = grouped.size().rename("seeds")
    dense = runs[runs["kind"] == "dense"]
    for (method, sparsity), block in runs.groupby(["method", "sparsity"], sort=False):
        for column in [c for c in cols if c.startswith(uncertainty.ITEM_COLUMNS)]:
            if column == "retained.mean_acc" and method == "dense":
                continue  # the reference itself: 100 by definition
            found = uncertainty.column_interval(block, dense, column)
            if found is None:
                continue
            if found.value == found.value:
                parts["mean"].loc[(method, sparsity), column] = found.value
            parts["low"].loc[(method, sparsity), column] = found.low
            parts["high"].loc[(method, sparsity), column] = found.high
    frame = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1).sort_index(axis=1)
    rank = {m: i for i, m in enumerate(methods or [])}
    order = sorted(frame.index, key=lambda k: (k[0] != "dense", k[1], rank.get(k[0], len(rank)), k[0]))
    missed = runs[missed_budget(runs)]
    flagged = runs[runs["nonfinite"].fillna("").astype(bool)] if "nonfinite" in runs else runs.iloc[:0]
    broken = runs[uncertainty.broken(runs)]
    return Summary(model, cols, frame.loc[order], seeds.loc[order],
                   frozenset(zip(missed["method"], missed["sparsity"], strict=True)),
                   frozenset(zip(flagged["method"], flagged["sparsity"], strict=True)),
                   frozenset(zip(broken["method"], broken["sparsity"], strict=True)))


def _cell(column: str, mean: float, low: float, high: float) -> str:
    """The mean and its 95% interval: '± half' for accuracies and run-level numbers, '[low, high]' for a perplexity
    (exp of an interval on the NLL: not symmetric)."""
    if mean != mean:
        return "–"
    if column == "params_compact":
        return f"{mean / 1e6:.2f}M"
    if column == RELAXED:
        return f"{mean:.3f}"
    if column.startswith("ppl."):
        text = f"{mean:.2f}" if mean < 100 else f"{mean:.4g}"
        return text if low != low else f"{text} [{low:.4g}, {high:.4g}]"
    half = (high - low) / 2
    if column.startswith(("acc.", "mean_acc")):
        text, half_text = f"{100 * mean:.1f}", f"{100 * half:.1f}"
    elif column.startswith("retained") or column == "prune_seconds":
        text, half_text = f"{mean:.2f}" if mean < 100 else f"{mean:.1f}", f"{half:.2f}"
    else:
        text, half_text = f"{mean:.2f}", f"{half:.2f}"
    return text if half != half else f"{text} ± {half_text}"


def seeds_text(seeds: int) -> str:
    """The seeds a row's intervals rest on: one seed covers the items only, and says so."""
    return "1 (items only)" if seeds == 1 else str(seeds)


def cells(summary: Summary) -> tuple[list[str], list[list[str]], set[tuple[int, str]]]:
    """Header, string cells, and which cells are bold (as (row, column) pairs)."""
    header = ["method", "sparsity", "seeds", *(label(c) for c in summary.columns)]
    body = []
    for (method, sparsity), row in summary.frame.iterrows():
        flags = (("†", summary.missed), ("‡", summary.nonfinite), ("✗", summary.broken))
        marks = "".join(mark for mark, rows in flags if (method, sparsity) in rows)
        name = f"{method} {marks}" if marks else str(method)
        body.append([name, f"{sparsity:.2f}", seeds_text(int(summary.seeds.loc[(method, sparsity)]))] +
                    [_cell(c, row[(c, "mean")], row[(c, "low")], row[(c, "high")]) for c in summary.columns])
    return header, body, summary.best()


def md_cell(value: object) -> str:
    """Text safe in one Markdown table cell: a `|` cannot end the cell, HTML in a label or path is shown, not
    rendered, and a line break cannot end the row."""
    text = " ".join(str(value).splitlines())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(summary: Summary) -> str:
    header, body, bold = cells(summary)
    lines = ["| " + " | ".join(map(md_cell, header)) + " |",
             "|" + "|".join(["---"] * LEAD + ["---:"] * (len(header) - LEAD)) + "|"]
    for i, row in enumerate(body):
        out = [md_cell(v) for v in row[:LEAD]] + [f"**{md_cell(v)}**" if (i, c) in bold else md_cell(v)
                                                  for c, v in zip(summary.columns, row[LEAD:], strict=True)]
        lines.append("| " + " | ".join(out) + " |")
    for note in summary.notes():
        lines += ["", note]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "†": r"\dag{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text).replace("±", r"$\pm$")


def latex(summary: Summary) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); a rule between sparsity levels."""
    header, body, bold = cells(summary)
    lines = [r"\begin{tabular}{" + "l" * LEAD + "r" * (len(header) - LEAD) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    previous = None
    for i, row in enumerate(body):
        if previous is not None and row[1] != previous:
            lines.append(r"\midrule")
        previous = row[1]
        out = [tex_escape(v) for v in row[:LEAD]]
        for c, v in zip(summary.columns, row[LEAD:], strict=True):
            out.append(r"\textbf{" + tex_escape(v) + "}" if (i, c) in bold else tex_escape(v))
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def html_table(summary: Summary) -> str:
    header, body, bold = cells(summary)
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>",
           "<tbody>"]
    for i, row in enumerate(body):
        tds = [f"<td>{html.escape(v)}</td>" for v in row[:LEAD]]
        tds += [f"<td><b>{html.escape(v)}</b></td>" if (i, c) in bold else f"<td>{html.escape(v)}</td>"
                for c, v in zip(summary.columns, row[LEAD:], strict=True)]
        out.append("<tr>" + "".join(tds) + "</tr>")
    note = [f'<p class="note">{html.escape(n)}</p>' for n in summary.notes()]
    return "\n".join([*out, "</tbody>", "</table>", *note]) + "\n"


def csv_frame(summary: Summary) -> pd.DataFrame:
    """Flat numbers: `<column>` (mean), `<column>.low` and `<column>.high` (the 95% interval), `<column>.n`, and
    the row's seeds."""
    flat = pd.DataFrame(index=summary.frame.index)
    flat["seeds"] = summary.seeds
    for c in summary.columns:
        flat[c] = summary.frame[(c, "mean")]
        flat[f"{c}.low"] = summary.frame[(c, "low")]
        flat[f"{c}.high"] = summary.frame[(c, "high")]
        flat[f"{c}.n"] = summary.frame[(c, "n")]
    return flat.reset_index()


def frame_markdown(df: pd.DataFrame) -> str:
    """Any small frame as a Markdown table (floats to 4 significant digits)."""
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else md_cell(v)

    lines = ["| " + " | ".join(map(md_cell, df.columns)) + " |", "|" + "|".join(["---"] * len(df.columns)) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
