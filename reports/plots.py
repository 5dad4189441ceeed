"""Figures: Pareto fronts (sparsity vs perplexity / accuracy), speedup and prune cost vs accuracy, mask-learning
loss curves and train-test mismatch. Every figure is written as PNG (web) and PDF (papers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.query import read_json
from suite.run.record import metric

# Okabe & Ito's colourblind-safe palette; past eight methods the marker (and in line plots the dash) tells them apart
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
MARKERS = "os^DvP*X"
DASHES = ("-", "--", ":", "-.")
_COLOURS: dict[str, int] = {}


def palette(methods: list[str]) -> None:
    """Fix each method's colour and marker for the figures that follow (a report calls it once with all of its
    methods, sorted), so one method looks the same in every figure."""
    _COLOURS.clear()
    _COLOURS.update({m: i for i, m in enumerate(dict.fromkeys(methods))})


def style(i: int) -> tuple[str, str]:
    """The i-th (colour, marker)."""
    return OKABE_ITO[i % len(OKABE_ITO)], MARKERS[(i + i // len(OKABE_ITO)) % len(MARKERS)]


def method_style(method: str) -> dict[str, str]:
    """Matplotlib keywords (color, marker, ls) of a method: fixed by `palette`, else the next free ones."""
    i = _COLOURS.setdefault(method, len(_COLOURS))
    colour, marker = style(i)
    return {"color": colour, "marker": marker, "ls": DASHES[(i // len(OKABE_ITO)) % len(DASHES)]}


def figure(ncols: int = 1, width: float = 4.6, height: float = 3.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def log_axis(ax: Any, which: str = "y") -> None:
    """A log scale with plain numbers at its ticks (20, 50, 100), not 10^1.3."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log") if which == "y" else ax.set_xscale("log")
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    plain = ScalarFormatter()
    plain.set_scientific(False)
    axis.set_major_formatter(plain)
    axis.set_minor_formatter("")


def outside_legend(ax: Any, **kwargs: Any) -> None:
    """The legend right of the axes, where it hides no data (`save` keeps it in the file)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7, **kwargs)


def save(fig: Any, stem: Path) -> Path:
    """`stem`.png and `stem`.pdf; returns the PNG.

    Suffixes are appended, never substituted: stems carry sparsities such as `sp0.5`, and `with_suffix` would
    cut them at the dot and let every cell of a grid overwrite the same file.
    """
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    fig.savefig(png, dpi=110, bbox_inches="tight")  # legends outside the axes and titles are never cut
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)
    return png


def _by_method(runs: pd.DataFrame, column: str) -> dict[str, pd.DataFrame]:
    """Mean and std over seeds of `column` per (method, sparsity), dense runs excluded."""
    pruned = runs[(runs["kind"] == "pruned") & runs[column].notna()] if column in runs else runs.iloc[:0]
    out = {}
    for method, rows in pruned.groupby("method"):
        out[str(method)] = rows.groupby("sparsity")[column].agg(["mean", "std"]).reset_index()
    return out


def pareto(runs: pd.DataFrame, ppl_column: str | None, stem: Path, title: str) -> Path:
    """Sparsity vs perplexity (log scale) and vs mean accuracy, one line per method, dense as a reference."""
    panels = [c for c in (ppl_column, "mean_acc") if c and c in runs]
    fig, axes = figure(len(panels))
    dense = runs[runs["kind"] == "dense"]
    for ax, column in zip(axes, panels, strict=True):
        for method, agg in _by_method(runs, column).items():
            ax.errorbar(agg["sparsity"], agg["mean"], yerr=agg["std"].fillna(0), capsize=3, label=method,
                        **method_style(method))
        if len(dense) and dense[column].notna().any():
            ax.axhline(dense[column].mean(), color="black", ls="--", lw=1, label="dense")
        ax.set(xlabel="sparsity (prunable params removed)", ylabel=metric(column).label)
        if column.startswith("ppl."):
            log_axis(ax)
    outside_legend(axes[-1])
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def scatter_vs_accuracy(runs: pd.DataFrame, x: str, xlabel: str, stem: Path, title: str,
                        log_x: bool = False) -> Path | None:
    """Mean accuracy against `x` (measured speedup, prune seconds), one marker per method, size by sparsity; None
    when no run measured `x` (speed off)."""
    pruned = runs[(runs["kind"] == "pruned")]
    if x not in pruned or "mean_acc" not in pruned or pruned[x].isna().all():
        return None
    fig, (ax,) = figure()
    for method, rows in pruned.groupby("method"):
        if rows[x].notna().any():
            look = method_style(str(method))
            ax.scatter(rows[x], rows["mean_acc"], s=30 + 200 * rows["sparsity"], alpha=0.75, label=str(method),
                       color=look["color"], marker=look["marker"])
    ax.set(xlabel=xlabel, ylabel=metric("mean_acc").label)
    if log_x:
        log_axis(ax, "x")
    outside_legend(ax)
    ax.set_title(title, fontsize=10)
    return save(fig, stem)


def curves(runs: pd.DataFrame, stem: Path, title: str,
           reader: Callable[[pd.Series, str], Any] = read_json) -> Path | None:
    """Loss curves (LM loss and hard sparsity over steps) of mask-learning runs, and their train-test mismatch."""
    learned = []
    for _, row in runs[runs["kind"] == "pruned"].iterrows():
        data = reader(row, "curves.json")
        if data and "lm_loss" in data:
            learned.append((row, data))
    if not learned:
        return None
    import matplotlib.pyplot as plt

    names = sorted({f"{r['method']} sp{r['sparsity']:g}" for r, _ in learned})
    fig = plt.figure(figsize=(9.2, 3.4 + 0.22 * len(names)))  # mismatch bars below: their labels need the width
    grid = fig.add_gridspec(2, 2, height_ratios=[3.4, 0.6 + 0.22 * len(names)])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    for row, data in learned:
        name = f"{row['method']} sp{row['sparsity']:g} s{row['seed']}"
        look = {"color": method_style(str(row["method"]))["color"], "ls": DASHES[int(row["seed"]) % len(DASHES)]}
        axes[0].plot(np.arange(1, len(data["lm_loss"]) + 1), data["lm_loss"], lw=1, label=name, **look)
        if "hard_sparsity" in data:
            axes[1].plot(np.arange(1, len(data["hard_sparsity"]) + 1), data["hard_sparsity"], lw=1, **look)
    axes[0].set(xlabel="step", ylabel="calibration LM loss", title="loss")
    axes[1].set(xlabel="step", ylabel="hard sparsity", title="discrete mask sparsity")
    frame = pd.DataFrame([{"name": f"{r['method']} sp{r['sparsity']:g}", "mismatch": r.get("diag_mismatch")}
                          for r, _ in learned]).dropna()
    if len(frame):
        means = frame.groupby("name", sort=False)["mismatch"].mean()
        axes[2].barh(means.index, means.values, color="tab:red")
        axes[2].axvline(0, color="black", lw=0.8)
    axes[2].set(xlabel="valid loss: last training mask - compact", title="train-test mismatch")
    fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2, fontsize=7, frameon=False)  # below the figure: `save` keeps it, and it hides no data
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def recovery_curves(runs: pd.DataFrame, stem: Path, title: str,
                    reader: Callable[[pd.Series, str], Any] = read_json) -> Path | None:
    """Each recovered run's training loss per step (its recovery.json), one colour per method: how fast, and how
    far, recovery brings each pruned model back."""
    recovered = [(row, data) for _, row in runs[runs["kind"] == "pruned"].iterrows()
                 if (data := reader(row, "recovery.json")) and data.get("curves", {}).get("loss")]
    if not recovered:
        return None
    fig, (ax,) = figure()
    for row, data in recovered:
        look = {"color": method_style(str(row["method"]))["color"], "ls": DASHES[int(row["seed"]) % len(DASHES)]}
        loss = data["curves"]["loss"]
        ax.plot(np.arange(1, len(loss) + 1), loss, lw=1, label=f"{row['method']} sp{row['sparsity']:g} s{row['seed']}",
                **look)
    kind = recovered[0][1].get("spec", {}).get("method", "")
    ax.set(xlabel="step", ylabel="training loss" + (" (KL + LM)" if kind == "distill" else " (next token)"),
           title=title)
    outside_legend(ax)
    return save(fig, stem)
