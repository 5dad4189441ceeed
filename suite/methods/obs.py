"""The shared local OBS pruner (SlimGPT's recipe, Ling et al. 2024): greedy group-OBS removal from one consumer and
exact refit.

One consumer (o_proj, down_proj or an expert's down projection) with input Gram matrix H and weight B (= W^T,
[columns, out]): units are removed greedily by their OBS cost 1/2 tr(B_g^T ([H^-1]_gg)^-1 B_g), with the OBS
update of the remaining weights and the inverse-Hessian downdate between rounds (heads one per round, channels in
`rounds` batches); the survivors can then be refit exactly by least squares (`refit_alive`). SlimGPT takes one
point of the removal path; Týr-the-Pruner takes several (its supernet levels) from one pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from suite.methods.capture import unit_columns
from suite.model.structures import Group


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


def _stops(group: Group, counts: list[int], rounds: int) -> list[int]:
    """Where the greedy pass recomputes costs: heads after every unit; channels in `rounds` batches of about equal
    size up to the largest count, each asked-for count also closing a batch (one count gives SlimGPT's schedule)."""
    top = max(counts, default=0)
    if group.kind == "attn":
        stops = list(range(1, top + 1))
    else:
        n_rounds = max(1, min(rounds, top))
        stops, done = [], 0
        for r in range(n_rounds):  # SlimGPT's plan: ceil of what is left over the rounds left
            done += math.ceil((top - done) / (n_rounds - r))
            stops.append(done)
    return sorted({*stops, *(c for c in counts if c > 0)})


def _greedy(h: Tensor, b0: Tensor, group: Group, stops: list[int]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The greedy OBS pass: at each stop, (stop, the units removed since the previous one in ascending cost, the
    OBS-updated weight [columns, out]); the weight is updated in place, copy it to keep it."""
    b = b0.clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    cols = unit_columns(group).to(h.device)
    alive = torch.ones(group.n_units, dtype=torch.bool)
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
        yield stop, units, b


def removal_path(h: Tensor, b0: Tensor, group: Group, counts: list[int], rounds: int) -> dict[int, Snapshot]:
    """Greedy OBS removal up to max(counts) units, snapshotting (alive units, updated weight) at every count."""
    counts = sorted(set(counts))
    out = {0: Snapshot(torch.ones(group.n_units, dtype=torch.bool), b0.clone())} if 0 in counts else {}
    alive = torch.ones(group.n_units, dtype=torch.bool)
    for stop, units, b in _greedy(h, b0, group, _stops(group, counts, rounds)):
        alive[units] = False
        if stop in counts:
            out[stop] = Snapshot(alive.clone(), b.clone())
    return out


def removal_order(h: Tensor, b0: Tensor, group: Group, rounds: int) -> Tensor:
    """The units in the order one greedy pass down to a single survivor removes them (a batch in ascending cost).
    The first c entries are the removed set at any count c, so one order serves every sparsity: Týr caches it."""
    stops = _stops(group, [group.n_units - 1], rounds)
    return torch.cat([units for _, units, _ in _greedy(h, b0, group, stops)])


def refit_alive(h: Tensor, b0: Tensor, group: Group, alive: Tensor) -> Tensor:
    """`refit` of the consumer columns that the alive units own: the exact least-squares weight [columns, out]."""
    cols = unit_columns(group).to(h.device)
    return refit(h, b0, cols[alive.to(h.device)].flatten())
