"""What each method removed: kept-unit maps per layer, from keep vectors alone (no pruner, no model needed).

Group names follow suite.structures: `L03.attn`, `L03.mlp`, `L03.expert005`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

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


def plot_masks(keep: Mapping[str, np.ndarray], path: Path, title: str = "") -> Path:
    """One figure: layer x attention-unit kept map, per-layer MLP kept fraction, layer x expert kept fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = parse(keep)
    panels = [k for k in ("attn", "mlp", "expert") if groups[k]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], panels, strict=True):
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
