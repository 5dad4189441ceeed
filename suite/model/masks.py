"""Masks, targets, and the one helper that turns per-unit scores into masks meeting a target exactly.

Every score-based method calls `select`: methods differ in how they score units, never in how a score vector
becomes a parameter budget, so sparsity means the same thing for all of them (docs/methods.md, sparsity).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from safetensors.torch import load_file, save_file
from torch import Tensor

from suite.errors import ConfigError, MaskMismatch, TargetUnreachable
from suite.model.structures import UNIT_KINDS, Group, Structure, UnitKind

SelectionMode = Literal["global", "per_layer", "uniform"]
Normalize = Literal["per_param", "raw"]


def pydantic_message(err: ValidationError) -> str:
    """One line naming the offending key and why, from a pydantic error."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "value"
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith("params."):  # a method's own config error, already keyed below this location
        return f"{loc}.{msg}"
    if msg.startswith(f"{loc}.") or (not first["loc"] and re.match(r"[\w.]+: ", msg)):  # names its own key path
        return msg
    if first["loc"] and re.match(r"[a-z_][\w.]*: ", msg):  # a validator naming a key below this location
        return f"{loc}.{msg}"
    return f"{loc}: {msg}"


def _unit_set(value: tuple[str, ...]) -> tuple[str, ...]:
    """A target's unit kinds: at least one, none twice, in one canonical order (so one set has one identity)."""
    if not value:
        raise ValueError(f"an empty list: name at least one unit kind ({', '.join(UNIT_KINDS)})")
    if len(set(value)) < len(value):
        raise ValueError(f"repeated unit kinds {list(value)}")
    return tuple(k for k in UNIT_KINDS if k in value)


class Target(BaseModel):
    """What a pruner must reach: parameter sparsity over prunable params, plus constraints shared by all methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(gt=0, lt=1, description="fraction of prunable parameters to remove")
    uniform: bool = Field(False, description="same kept width in every pruned layer, per unit kind")
    skip_layers: tuple[int, ...] = Field((), description="decoder layers that are never pruned")
    min_keep: int = Field(1, ge=1, description="minimum kept units in every group")
    round_to: int = Field(1, ge=1, description="kept MLP/expert widths are a multiple of this (or the full width)")
    units: Annotated[tuple[UnitKind, ...], AfterValidator(_unit_set)] | None = Field(
        None, description="unit kinds that may be pruned, the same for every method (attention, mlp, expert); "
        "sparsity is a fraction of their parameters. Default: attention + mlp on a dense model, expert channels only "
        "on an MoE model (as the DDP paper prunes them)")

    @classmethod
    def parse(cls, **values: Any) -> Target:
        """Validate, turning pydantic's report into a one-line ConfigError."""
        try:
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(f"target.{pydantic_message(err)}") from None

    def budget(self, structure: Structure) -> int:
        """Prunable parameters to remove."""
        return round(self.sparsity * structure.prunable_params)


# The constraints a target adds to its sparsity: an experiment's `target:` section (each grid point adds its sparsity)
# and the `prune` command's flags. Target's own fields, so the two can never drift apart.
TargetConstraints = create_model(
    "TargetConstraints", __config__=ConfigDict(extra="forbid", frozen=True),
    **{name: (f.annotation, f) for name, f in Target.model_fields.items() if name != "sparsity"},
)


@dataclass
class Masks:
    """Per group a boolean keep vector [n_units], optionally a float scale per unit to fold into the weights."""

    keep: dict[str, Tensor]
    scale: dict[str, Tensor] = field(default_factory=dict)
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # written in masks.safetensors' header; see `describe`

    def describe(self, **facts: Any) -> None:
        """Record facts about these masks in their header, the one way `meta` is written: what made them (method,
        seed, target, calibration, the parent of a nested subset; the pipeline) and the parameters each group
        holds and gives up (compaction), so a report can read them without the model."""
        self.meta |= facts

    @classmethod
    def dense(cls, structure: Structure) -> Masks:
        keep = {g.name: torch.ones(g.n_units, dtype=torch.bool) for g in structure.groups}
        return cls(keep, fingerprint=structure.fingerprint)

    def check(self, structure: Structure) -> None:
        """Refuse masks made for another structure."""
        if self.fingerprint != structure.fingerprint:
            raise MaskMismatch(
                f"masks were made for structure {self.fingerprint}, this model's structure is "
                f"{structure.fingerprint} ({structure.family}, {structure.granularity})"
            )
        for g in structure.groups:
            if g.name not in self.keep or self.keep[g.name].shape != (g.n_units,):
                raise MaskMismatch(f"masks have no keep vector of {g.n_units} units for group {g.name}")

    def removed_params(self, structure: Structure) -> int:
        return sum(g.removed_params(self.keep[g.name]) for g in structure.groups)

    def sparsity(self, structure: Structure) -> float:
        """Fraction of prunable parameters removed (the project's definition of sparsity)."""
        return self.removed_params(structure) / structure.prunable_params

    def total_sparsity(self, structure: Structure) -> float:
        """Fraction of all model parameters removed (comparable with papers that count embeddings)."""
        return self.removed_params(structure) / structure.total_params

    def kept(self) -> dict[str, int]:
        return {name: int(k.sum()) for name, k in self.keep.items()}

    def save(self, directory: Path) -> None:
        """Write `masks.safetensors` (tensors + JSON header) and a readable `masks.json` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"keep/{n}": k.to(torch.uint8).contiguous() for n, k in self.keep.items()}
        tensors |= {f"scale/{n}": s.float().contiguous() for n, s in self.scale.items()}
        header = {"fingerprint": self.fingerprint, "meta": self.meta}
        save_file(tensors, str(directory / "masks.safetensors"), metadata={"prunebench": json.dumps(header)})
        summary = header | {"kept_units": self.kept(), "scaled_groups": sorted(self.scale)}
        (directory / "masks.json").write_text(json.dumps(summary, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: Path, structure: Structure | None = None) -> Masks:
        """Read masks saved by `save`; with a structure, refuse a mismatch clearly."""
        path = directory / "masks.safetensors"
        if not path.is_file():
            raise MaskMismatch(f"no masks at {path}")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {}).get("prunebench", "{}"))
        tensors = load_file(str(path))
        keep = {k.split("/", 1)[1]: v.bool() for k, v in tensors.items() if k.startswith("keep/")}
        scale = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("scale/")}
        masks = cls(keep, scale, header.get("fingerprint", ""), header.get("meta", {}))
        if structure is not None:
            masks.check(structure)
        return masks


# ---------------------------------------------------------------------------------------------------------------
# Scores -> masks


@dataclass
class _Ladder:
    """The kept widths a group may take (descending, from full) and what each costs and retains."""

    group: Group
    order: Tensor  # unit indices by ascending score: the first n - w are removed at width w
    widths: list[int]
    removed: list[int]  # params removed at each width
    priority: list[float]  # mean normalised score of the units removed by the step into each width (0 unused)
    retained: list[float]  # sum of normalised scores kept at each width
    tie: list[float]  # seeded random key per step: breaks equal priorities across groups

    def keep(self, i: int) -> Tensor:
        k = torch.zeros(self.group.n_units, dtype=torch.bool)
        k[self.order[self.group.n_units - self.widths[i] :]] = True
        return k


def _ladder(group: Group, score: Tensor, target: Target, normalize: Normalize, gen: torch.Generator,
            allowed: Collection[int] | None = None) -> _Ladder:
    n = group.n_units
    if score.shape != (n,):
        raise ConfigError(f"scores for {group.name} have shape {tuple(score.shape)}, expected ({n},)")
    norm = score.double() / (group.unit_params if normalize == "per_param" else 1.0)
    # ascending score, equal scores in a seeded random order (never by unit index)
    shuffled = torch.randperm(n, generator=gen)
    order = shuffled[torch.sort(norm[shuffled], stable=True).indices]
    if group.layer in target.skip_layers:
        widths = [n]
    else:
        step = target.round_to if group.kind != "attn" else 1
        lo = min(target.min_keep, n)
        widths = [n] + [w for w in range(n - 1, lo - 1, -1) if w % step == 0 and (allowed is None or w in allowed)]
    ranked = norm[order]
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), ranked.cumsum(0)])
    total = float(csum[-1])
    removed, priority, retained = [], [], []
    for i, w in enumerate(widths):
        if group.kv_params:  # shared K/V heads: the cost depends on which heads go
            k = torch.zeros(n, dtype=torch.bool)
            k[order[n - w :]] = True
            removed.append(group.removed_params(k))
        else:
            removed.append((n - w) * group.unit_params)
        retained.append(total - float(csum[n - w]))
        if i == 0:
            priority.append(0.0)
        else:
            a, b = n - widths[i - 1], n - w
            priority.append(float(csum[b] - csum[a]) / (b - a))
    tie = torch.rand(len(widths), generator=gen, dtype=torch.float64).tolist()
    return _Ladder(group, order, widths, removed, priority, retained, tie)


def select(
    structure: Structure,
    scores: Mapping[str, Tensor],
    target: Target,
    mode: SelectionMode = "global",
    normalize: Normalize = "per_param",
    widths: Mapping[str, Collection[int]] | None = None,
    seed: int = 0,
) -> Masks:
    """Keep the highest-scoring units so that the removed parameters meet `target` as closely as units allow.

    scores: per group [n_units], higher = more important. Modes: `global` ranks all units of all layers together
    (by score per parameter, or raw); `per_layer` removes the same parameter fraction from every group; `uniform`
    keeps one width per unit kind in every pruned layer (forced when `target.uniform`). The result is within one
    removal step (one unit; `round_to` units; one unit per layer under uniform widths) of the budget. `widths`
    (per unit kind) restricts the kept widths a group may take, e.g. to those a stock config can declare.

    Equal scores (hard-concrete log-alphas at their clamp, units a method never moved) are ordered by a random key
    drawn from `seed`, within a group and between groups, so a tie never takes the whole budget from the first
    layers; the same seed gives the same masks.
    """
    for layer in target.skip_layers:
        if not 0 <= layer < structure.n_layers:
            raise ConfigError(f"target.skip_layers: layer {layer} outside 0..{structure.n_layers - 1}")
    missing = [g.name for g in structure.groups if g.name not in scores]
    if missing:
        raise ConfigError(f"no scores for groups {missing[:3]}")
    gen = torch.Generator().manual_seed(seed)
    ladders = [_ladder(g, scores[g.name], target, normalize, gen, (widths or {}).get(g.kind))
               for g in structure.groups]
    budget = target.budget(structure)
    reachable = sum(lad.removed[-1] for lad in ladders)
    if reachable < budget:
        raise TargetUnreachable(
            f"sparsity {target.sparsity} is unreachable under the constraints "
            f"(at most {reachable / structure.prunable_params:.4f} can be removed)"
        )
    if target.uniform or mode == "uniform":
        position = _select_uniform(ladders, budget)
    elif mode == "per_layer":
        position = _select_per_layer(ladders, budget)
    elif mode == "global":
        position = _select_global(ladders, budget)
    else:
        raise ConfigError(f"unknown selection mode {mode!r}; allowed: global, per_layer, uniform")
    keep = {lad.group.name: lad.keep(i) for lad, i in zip(ladders, position, strict=True)}
    return Masks(keep, fingerprint=structure.fingerprint)


def _select_global(ladders: list[_Ladder], budget: int) -> list[int]:
    position = [0] * len(ladders)
    heap = [(lad.priority[1], lad.tie[1], j) for j, lad in enumerate(ladders) if len(lad.widths) > 1]
    heapq.heapify(heap)
    removed, last = 0, None
    while removed < budget and heap:
        *_, j = heapq.heappop(heap)
        lad = ladders[j]
        removed += lad.removed[position[j] + 1] - lad.removed[position[j]]
        position[j] += 1
        last = j
        if position[j] + 1 < len(lad.widths):
            heapq.heappush(heap, (lad.priority[position[j] + 1], lad.tie[position[j] + 1], j))
    if last is not None:  # the last step may overshoot by more than it would undershoot without it
        delta = ladders[last].removed[position[last]] - ladders[last].removed[position[last] - 1]
        if abs(removed - delta - budget) < abs(removed - budget):
            position[last] -= 1
    return position


def _select_per_layer(ladders: list[_Ladder], budget: int) -> list[int]:
    pruned = [lad for lad in ladders if len(lad.widths) > 1]
    ratio = budget / sum(lad.group.params for lad in pruned)
    position = []
    for lad in ladders:
        goal = ratio * lad.group.params if len(lad.widths) > 1 else 0
        position.append(min(range(len(lad.widths)), key=lambda i, lad=lad, goal=goal: abs(lad.removed[i] - goal)))
    gap = budget - sum(lad.removed[i] for lad, i in zip(ladders, position, strict=True))
    while True:  # per-group rounding adds up: close the gap one step at a time, lowest-score steps first
        best = None
        for j, lad in enumerate(ladders):
            i = position[j]
            for move in (1, -1):
                if 0 <= i + move < len(lad.widths):
                    after = gap - (lad.removed[i + move] - lad.removed[i])
                    prio = lad.priority[i + 1] if move == 1 else -lad.priority[i]
                    cand = (abs(after), prio, lad.tie[i + max(move, 0)], j, move, after)
                    best = cand if best is None or cand < best else best
        if best is None or best[0] >= abs(gap):
            return position
        *_, j, move, gap = best
        position[j] += move


def _select_uniform(ladders: list[_Ladder], budget: int) -> list[int]:
    by_kind: dict[str, list[int]] = {}
    for j, lad in enumerate(ladders):
        if len(lad.widths) > 1:
            by_kind.setdefault(lad.group.kind, []).append(j)
    for kind, idx in by_kind.items():
        sizes = {ladders[j].group.n_units for j in idx}
        if len(sizes) > 1:
            raise TargetUnreachable(
                f"uniform widths need one {kind} width in every pruned layer, found {sorted(sizes)}"
            )
    kinds = sorted(by_kind, key=lambda k: len(ladders[by_kind[k][0]].widths))
    # per kind and ladder position: params removed and score retained, summed over that kind's groups
    removed = {k: [sum(ladders[j].removed[i] for j in by_kind[k]) for i in range(len(ladders[by_kind[k][0]].widths))]
               for k in kinds}
    retained = {k: [sum(ladders[j].retained[i] for j in by_kind[k]) for i in range(len(removed[k]))] for k in kinds}
    last, others = kinds[-1], kinds[:-1]
    best: tuple[float, float, tuple[int, ...]] | None = None
    for combo in itertools.product(*(range(len(removed[k])) for k in others)):
        rest = budget - sum(removed[k][i] for k, i in zip(others, combo, strict=True))
        i = bisect.bisect_left(removed[last], rest)  # removed[last] ascends with the ladder position
        for cand in (i - 1, i):
            if 0 <= cand < len(removed[last]):
                gap = abs(rest - removed[last][cand])
                step = max(b - a for a, b in itertools.pairwise(removed[last]))
                score = sum(retained[k][c] for k, c in zip(others, combo, strict=True)) + retained[last][cand]
                key = (0 if 2 * gap <= step else gap, -score, (*combo, cand))
                best = key if best is None or key[:2] < best[:2] else best
    assert best is not None
    position = [0] * len(ladders)
    for k, i in zip(kinds, best[2], strict=True):
        for j in by_kind[k]:
            position[j] = i
    return position
