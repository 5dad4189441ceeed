"""The shared local OBS pruner (METHODS.md B4d): greedy group-OBS removal from one consumer and exact refit.

One consumer (o_proj, down_proj or an expert's down projection) with input Gram matrix H and weight B (= W^T,
[columns, out]): units are removed greedily by their OBS cost 1/2 tr(B_g^T ([H^-1]_gg)^-1 B_g), with the OBS
update of the remaining weights and the inverse-Hessian downdate between rounds (heads one per round, channels in
`rounds` batches); the survivors can then be refit exactly by least squares (`refit_alive`). SlimGPT takes one
point of the removal path; Týr-the-Pruner takes several (its supernet levels) from one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from suite.capture import unit_columns
from suite.structures import Group


def obs_costs(b: Tensor, hinv: Tensor, cols: Tensor) -> Tensor:
    """Per unit: 1/2 tr(B_g^T ([H^-1]_gg)^-1 B_g), the output error its removal causes after the OBS update."""
    bg = b[cols]  # [n, g, out]
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [n, g, g]
    return 0.5 * (bg * torch.linalg.solve(blocks, bg)).sum((1, 2))


def refit(h: Tensor, b: Tensor, kept: Tensor) -> Tensor:
    """argmin_B' ||X B' - X B|| with B' zero outside the kept rows: B'_K = (H_KK)^-1 (H B)_K."""
    out = torch.zeros_like(b)
    out[kept] = torch.linalg.solve(h[kept][:, kept], (h @ b)[kept])
    return out


@dataclass
class Snapshot:
    """The removal path at one count: which units are alive, and the OBS-updated weight [columns, out]."""

    alive: Tensor
    weight: Tensor


def removal_path(h: Tensor, b0: Tensor, group: Group, counts: list[int], rounds: int) -> dict[int, Snapshot]:
    """Greedy OBS removal up to max(counts) units, snapshotting at every count asked for.

    Heads go one per round; channels in `rounds` batches of about equal size up to the largest count, each asked-for
    count also closing a batch (so a single count gives exactly SlimGPT's schedule)."""
    counts = sorted(set(counts))
    top = counts[-1] if counts else 0
    if group.kind == "attn":
        stops = list(range(1, top + 1))
    else:
        n_rounds = max(1, min(rounds, top))
        stops, done = [], 0
        for r in range(n_rounds):  # SlimGPT's plan: ceil of what is left over the rounds left
            done += math.ceil((top - done) / (n_rounds - r))
            stops.append(done)
    stops = sorted({*stops, *(c for c in counts if c > 0)})
    b = b0.clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    cols = unit_columns(group).to(h.device)
    alive = torch.ones(group.n_units, dtype=torch.bool)
    out = {0: Snapshot(alive.clone(), b.clone())} if 0 in counts else {}
    removed = 0
    for stop in stops:
        cost = obs_costs(b, hinv, cols).masked_fill(~alive.to(h.device), math.inf)
        units = torch.sort(cost, stable=True).indices[: stop - removed].cpu()
        s = cols[units.to(h.device)].flatten()
        hss = hinv[s][:, s]
        b -= hinv[:, s] @ torch.linalg.solve(hss, b[s])
        b[s] = 0
        hinv -= hinv[:, s] @ torch.linalg.solve(hss, hinv[s, :])
        hinv[s, :] = 0
        hinv[:, s] = 0
        hinv[s, s] = 1  # removed columns drop out of every later block solve
        alive[units] = False
        removed = stop
        if stop in counts:
            out[stop] = Snapshot(alive.clone(), b.clone())
    return out


def refit_alive(h: Tensor, b0: Tensor, group: Group, alive: Tensor) -> Tensor:
    """`refit` of the consumer columns that the alive units own: the exact least-squares weight [columns, out]."""
    cols = unit_columns(group).to(h.device)
    return refit(h, b0, cols[alive.to(h.device)].flatten())
