"""What each method removed: kept-unit maps per layer, from keep vectors alone (no pruner, no model needed).

Group names follow suite.model.structures: `L03.attn`, `L03.mlp`, `L03.expert005`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_NAME = re.compile(r"^L(\d+)\.(attn|mlp|expert)(\d*)$")


def parse(keep: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """{'attn': {layer: keep}, 'mlp': {layer: keep}, 'expert': {(layer, e): keep}}."""
    out: dict[str, dict] = {"attn": {}, "mlp": {}, "expert": {}}
    for name, k in keep.items():
        m = _NAME.match(name)
        if m is None:
            continue
        layer, kind, expert = int(m.group(1)), m.group(2), m.group(3)
        out[kind][(layer, int(expert)) if kind == "expert" else layer] = np.asarray(k, dtype=float)
    return out


def run_heatmap(folder: Path, spec: Any, result: Any) -> None:
    """The runner's artifact writer (handed in by the CLI): a pruned run's mask heatmap, `heatmap.png`/`.pdf`."""
    plot_masks({n: k.numpy() for n, k in result.masks.keep.items()}, folder / "heatmap", title=spec.name)


def plot_masks(keep: Mapping[str, np.ndarray], stem: Path, title: str = "") -> Path:
    """One figure (`stem`.png/.pdf): layer x attention-unit kept map (the DDP paper's Fig. 4/5 style), per-layer MLP
    kept fraction, layer x expert kept fraction (its Fig. 6 style)."""
    from reports.plots import figure, save

    groups = parse(keep)
    panels = [k for k in ("attn", "mlp", "expert") if groups[k]]
    fig, axes = figure(len(panels), width=4.2, height=3.6)
    import matplotlib.ticker
    from matplotlib.ticker import MaxNLocator

    for ax, kind in zip(axes, panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        data = groups[kind]
        if kind == "attn":
            layers = sorted(data)
            width = max(len(v) for v in data.values())
            grid = np.full((len(layers), width), np.nan)
            for i, layer in enumerate(layers):
                grid[i, : len(data[layer])] = data[layer]
            ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
            ax.set(xlabel="attention unit", ylabel="layer", title="attention units kept")
            ax.set_yticks(range(len(layers)), layers)
        elif kind == "mlp":
            layers = sorted(data)
            ax.barh(layers, [data[layer].mean() for layer in layers], color="tab:blue")
            ax.xaxis.set_major_locator(matplotlib.ticker.AutoLocator())
            ax.set(xlim=(0, 1), xlabel="fraction of channels kept", ylabel="layer", title="MLP channels kept")
            ax.invert_yaxis()
        else:
            layers = sorted({layer for layer, _ in data})
            experts = sorted({e for _, e in data})
            grid = np.full((len(layers), len(experts)), np.nan)
            for (layer, e), v in data.items():
                grid[layers.index(layer), experts.index(e)] = v.mean()
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set(xlabel="expert", ylabel="layer", title="expert channels kept (fraction)")
            ax.set_yticks(range(len(layers)), layers)
            fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def layer_sparsity(keep: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[int, float]:
    """Fraction of each layer's prunable parameters removed (weights from the per-group counts in the masks meta;
    unit counts where an older run did not record them)."""
    params, removed = meta.get("group_params", {}), meta.get("group_removed", {})
    total: dict[int, float] = {}
    gone: dict[int, float] = {}
    for name, k in keep.items():
        m = _NAME.match(name)
        if m is None:
            continue
        layer = int(m.group(1))
        k = np.asarray(k, dtype=bool)
        total[layer] = total.get(layer, 0.0) + params.get(name, k.size)
        gone[layer] = gone.get(layer, 0.0) + removed.get(name, int((~k).sum()))
    return {layer: gone[layer] / total[layer] for layer in sorted(total) if total[layer]}


def plot_profiles(profiles: Mapping[str, Mapping[int, float]], stem: Path, title: str) -> Path:
    """Per-layer sparsity of every method on one plot: where does each method cut?"""
    from matplotlib.ticker import MaxNLocator

    from reports.plots import DASHES, figure, method_style, outside_legend, save

    fig, (ax,) = figure()
    for i, (method, profile) in enumerate(profiles.items()):  # line styles keep coinciding profiles visible
        layers = sorted(profile)
        ax.plot(layers, [profile[layer] for layer in layers], label=method,
                **method_style(method) | {"ls": DASHES[i % len(DASHES)]})
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="fraction of layer's prunable params removed", ylim=(0, 1))
    outside_legend(ax)
    ax.set_title(title, fontsize=10)
    return save(fig, stem)


def removed_units(keep: Mapping[str, np.ndarray]) -> np.ndarray:
    """All units of a model in a fixed order (sorted group names), True where removed."""
    return np.concatenate([~np.asarray(keep[name], dtype=bool) for name in sorted(keep)])


def jaccard(keeps: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """Jaccard overlap |A and B| / |A or B| of the units two methods removed (same model, sparsity and seed)."""
    names = list(keeps)
    removed = {n: removed_units(keeps[n]) for n in names}
    out = np.ones((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            union = np.logical_or(removed[a], removed[b]).sum()
            out[i, j] = np.logical_and(removed[a], removed[b]).sum() / union if union else 1.0
    return names, out


def plot_jaccard(names: list[str], matrix: np.ndarray, stem: Path, title: str) -> Path:
    from reports.plots import figure, save

    fig, (ax,) = figure(width=1.2 + 0.7 * len(names), height=0.9 + 0.6 * len(names))
    im = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    return save(fig, stem)
