"""`tyr`: Týr-the-Pruner (Li et al., arXiv 2503.09657; docs/methods.md), scaled by settings to small machines.

1. Supernet (Alg. 1): for every module (a layer's attention, its MLP, or one expert) the shared local OBS pruner
   (suite.methods.obs: greedy OBS, exact refit) produces a ladder of levels, centre +- `levels` steps of `step` x the
   module's units, centred on the uniform per-layer distribution. Layers are visited in order and each next layer
   is measured with the previous ones set to their centre level (expectation error accumulation, Týr's median
   version). Levels are cached on disk per layer under a content hash of everything that determines them (model
   weights, calibration, local-pruner settings, the layer's goals and the hash of the layers before it), so a re-run
   (another seed, other search settings, a resumed sweep) loads them instead of pruning again.
2. Search (Alg. 2): the state is one level per module, starting from the centre (uniform). Each generation makes
   `offspring` unique children by min(U{1..4}, U{1..4}) paired moves inside one module kind (one module a level
   up, another a level down: the parameter count is invariant), then selects in stages on growing token budgets
   (`stage_tokens`, keeping `stage_keep`), each stage on a fresh seeded random subset of the calibration
   sequences, the parent joining the last stage (elitism). Fitness: KL(dense ||
   pruned) on the dense model's top-k logits (`topk_kl`, Týr's default), the full KL, or perplexity.
3. Coarse-to-fine: `rounds` rounds, each rebuilding the supernet around the distribution found, with the step halved.
The result is the chosen level of every module: its kept units and its refit consumer weights, written in place.

Scaled-down defaults (Týr: 9 levels, 12.5% steps, 4 rounds, 50 generations of 128 offspring on 2K/16K/131K tokens)
are settings. Sparsity is counted in parameters like every method here; under `query_head` granularity with shared
K/V heads the removed parameters depend on which heads go, so offspring that would move the total away from the
budget are discarded.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from suite.methods import (
    Calibration,
    ConfigError,
    Group,
    Masks,
    MethodConfig,
    Pruner,
    PruneResult,
    Structure,
    Target,
    cache_dir,
    calibration_ids,
    closest_count,
    consumer_weight,
    decoder_layers,
    eval_mode,
    locked,
    model_device,
    next_token_nll,
    refit_alive,
    register,
    removal_goals,
    removal_order,
    replacing_file,
    walk,
)

CACHE_VERSION = 2


class TyrConfig(MethodConfig):
    levels: int = Field(2, ge=1, description="supernet levels on each side of the centre (Týr: 4)")
    step: float = Field(0.125, gt=0, lt=1, description="first-round level spacing, fraction of a module's units")
    rounds: int = Field(2, ge=1, description="coarse-to-fine rounds, the step halving each round (Týr: 4)")
    generations: int = Field(6, ge=0, description="generations per round (Týr: 50)")
    offspring: int = Field(12, ge=1, description="unique children per generation (Týr: 128)")
    stage_tokens: list[int] = Field([1024, 4096, 8192], description="token budget of each selection stage")
    stage_keep: list[int] = Field([4, 2, 1], description="candidates kept after each stage")
    stage_draw: Literal["fresh", "first"] = Field(
        "fresh", description="sequences a selection stage scores on: a fresh seeded random subset per stage (Týr), "
        "or always the first ones")
    fitness: Literal["topk_kl", "kl", "ppl"] = Field("topk_kl", description="search objective")
    kl_topk: int = Field(8192, ge=1, description="dense top-k logits of the top-k KL")
    damp: float = Field(0.01, ge=0, description="H += damp * mean(diag H) * I for the local pruner")
    obs_rounds: int = Field(16, ge=1, description="greedy OBS rounds for channels (heads: one per round)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    accumulate: Literal["expectation", "dense"] = Field(
        "expectation", description="inputs each layer's levels are measured on: the prefix at its centre levels "
        "(Týr's expectation error accumulation) or the dense prefix (sparsity-independent: cached levels serve "
        "every sparsity)")
    cache: bool = Field(True, description="cache supernet levels under $PRUNEBENCH_CACHE/tyr")

    @model_validator(mode="after")
    def _stages(self) -> TyrConfig:
        if len(self.stage_tokens) != len(self.stage_keep) or not self.stage_tokens:
            raise ValueError("stage_tokens and stage_keep need one entry per selection stage")
        if any(k < 1 for k in self.stage_keep) or any(t < 1 for t in self.stage_tokens):
            raise ValueError("stage budgets and keeps must be positive")
        return self

    # the search's size, scaled down from Týr's (levels 4, rounds 4, generations 50, offspring 128) to fit a CPU
    budget: ClassVar[frozenset[str]] = frozenset({"levels", "rounds", "generations", "offspring", "stage_tokens",
                                                  "stage_keep", "kl_topk", "obs_rounds", "batch_size", "cache"})


@dataclass
class Ladder:
    """One module's levels: unit counts removed (ascending) along its greedy removal order, and where each level's
    refit weight is stored (the cache file, or memory when caching is off)."""

    group: Group
    order: Tensor
    counts: list[int]
    removed: list[int]  # parameters removed at each level
    centre: int  # index into counts
    file: Path | None = None
    tensors: dict[str, Tensor] | None = None

    def load(self, level: int) -> tuple[Tensor, Tensor]:
        key = f"{self.group.name}/{self.counts[level]}/weight"
        if self.tensors is not None:
            return _alive(self.order, self.counts[level]), self.tensors[key]
        with safe_open(str(self.file), framework="pt") as f:
            return _alive(self.order, self.counts[level]), f.get_tensor(key)


def _alive(order: Tensor, count: int) -> Tensor:
    alive = torch.ones(len(order) + 1, dtype=torch.bool)  # the order stops at one survivor
    alive[order[:count].long()] = False
    return alive


class Reference:
    """The dense model's next-token distributions on every calibration sequence, in the form the fitness needs, so
    that each search stage can score its candidates on any subset of them."""

    def __init__(self, model: nn.Module, ids: Tensor, cfg: TyrConfig) -> None:
        self.ids, self.cfg = ids, cfg
        self.logp: Tensor | None = None  # [n, seq, k]
        self.index: Tensor | None = None  # [n, seq, k] vocabulary ids of the top-k logits, None for the full KL
        if cfg.fitness == "ppl":
            return
        logp, index = [], []
        with torch.no_grad():
            for batch in ids.split(cfg.batch_size):
                logits = model(batch.to(model_device(model)), use_cache=False).logits.float().cpu()
                if cfg.fitness == "topk_kl" and cfg.kl_topk < logits.shape[-1]:
                    idx = logits.topk(cfg.kl_topk, dim=-1).indices
                    index.append(idx.to(torch.int32))
                    logits = logits.gather(-1, idx)
                logp.append(logits.log_softmax(-1))
        self.logp = torch.cat(logp)
        self.index = torch.cat(index) if index else None

    @torch.no_grad()
    def score(self, model: nn.Module, rows: list[int]) -> float:
        """Token-weighted mean KL(dense || pruned) over the top-k (or all) logits of the sequences `rows`, or the
        pruned model's loss on them."""
        total, count = 0.0, 0
        for chunk in torch.tensor(rows, dtype=torch.long).split(self.cfg.batch_size):
            batch = self.ids[chunk]
            logits = model(batch.to(model_device(model)), use_cache=False).logits.float().cpu()
            if self.logp is None:
                total += float(next_token_nll(logits, batch, reduction="sum"))
                count += batch[:, 1:].numel()
                continue
            dense = self.logp[chunk]
            if self.index is not None:
                logits = logits.gather(-1, self.index[chunk].long())
            total += float((dense.exp() * (dense - logits.log_softmax(-1))).sum())
            count += dense.shape[0] * dense.shape[1]
        return total / max(count, 1)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if isinstance(part, Tensor)
                 else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


@register("tyr")
class Tyr(Pruner):
    """Týr-the-Pruner: supernet of locally pruned levels + evolutionary search of the per-layer distribution."""

    Config = TyrConfig
    needs_calibration = True
    quick: ClassVar[dict[str, Any]] = {"generations": 2, "offspring": 4, "stage_tokens": [64, 256],
                                       "stage_keep": [2, 1]}

    def check_target(self, target: Target) -> None:
        if target.uniform or target.round_to > 1:
            raise ConfigError("tyr searches non-uniform per-layer widths: targets with uniform or round_to are "
                              "not supported")

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        cfg = self.config
        ids = calibration_ids(self.name, calibration)
        self.check_target(target)
        started = time.perf_counter()
        with eval_mode(model):
            stage_seqs = [min(len(ids), math.ceil(t / ids.shape[1])) for t in cfg.stage_tokens]
            search = Reference(model, ids, cfg)
            fixed = list(range(stage_seqs[-1]))  # the before/after objective: the same sequences for both
            valid_ids = calibration.valid_ids
            held_out = Reference(model, valid_ids, cfg) if valid_ids is not None else None
            dense = {g.name: consumer_weight(model, g).detach().clone() for g in structure.groups}
            goals = removal_goals(structure, target, "per_layer")
            budget = sum(goals.values())
            tolerance = max(g.unit_params + g.kv_params for g in structure.groups) / 2
            rng = random.Random(seed)
            draws = random.Random(f"{seed}:stages")  # the sequences each selection stage scores on
            curves: dict[str, list[float]] = {"fitness": [], "round": []}
            diagnostics: dict[str, Any] = {"cached_layers": 0, "built_modules": 0, "refit_levels": 0,
                                           "supernet_seconds": 0.0}
            step = cfg.step
            state: dict[str, int] = {}
            for r in range(cfg.rounds):
                t0 = time.perf_counter()
                ladders = self._supernet(model, structure, ids, target, goals, step, dense, diagnostics)
                diagnostics["supernet_seconds"] += time.perf_counter() - t0
                state = {n: lad.centre for n, lad in ladders.items()}
                apply = _applier(model, ladders)
                apply(state)
                if r == 0:
                    diagnostics["fitness_uniform"] = search.score(model, fixed)
                    if held_out is not None:
                        diagnostics["fitness_uniform_held_out"] = held_out.score(model, list(range(len(valid_ids))))
                for _ in range(cfg.generations):
                    state, best = self._generation(model, ladders, state, apply, search, stage_seqs, budget, tolerance,
                                                   rng, draws)
                    curves["fitness"].append(best)
                    curves["round"].append(r)
                    if self.step_callback is not None:
                        self.step_callback(len(curves["fitness"]) - 1, curves)
                goals = {n: lad.removed[state[n]] for n, lad in ladders.items()}
                step /= 2
                if r < cfg.rounds - 1:
                    _restore(model, structure, dense)
            apply(state)
            diagnostics["fitness_searched"] = search.score(model, fixed)
            if held_out is not None:
                diagnostics["fitness_searched_held_out"] = held_out.score(model, list(range(len(valid_ids))))
            keep = {}
            for g in structure.groups:
                lad = ladders.get(g.name)
                keep[g.name] = lad.load(state[g.name])[0] if lad else torch.ones(g.n_units, dtype=torch.bool)
        diagnostics["seconds"] = time.perf_counter() - started
        return PruneResult(Masks(keep, fingerprint=structure.fingerprint), curves=curves, diagnostics=diagnostics,
                           timings={"supernet_seconds": diagnostics["supernet_seconds"]})

    # -- supernet ---------------------------------------------------------------------------------------------

    def _supernet(self, model: nn.Module, structure: Structure, ids: Tensor, target: Target,
                  goals: dict[str, int], step: float, dense: dict[str, Tensor],
                  diagnostics: dict[str, Any]) -> dict[str, Ladder]:
        """Levels of every prunable module, layer by layer (or from the cache).

        A layer's cache file is keyed by a hash chain over everything its levels depend on: calibration, local-pruner
        settings, the weights outside the layers, and every layer up to this one as its inputs saw them (under
        `expectation`, the earlier layers' centre counts too). It holds each module's greedy removal order and the
        refit weight of every level asked for so far; a ladder for another sparsity or a finer round reads the same
        order and refits only the levels it lacks."""
        cfg = self.config
        settings = {"v": CACHE_VERSION, "damp": cfg.damp, "obs_rounds": cfg.obs_rounds,
                    "granularity": structure.granularity}
        chain = _digest(ids, settings, structure.fingerprint,
                        *[p for n, p in model.named_parameters() if ".layers." not in n])
        root = cache_dir() / "tyr"
        ladders: dict[str, Ladder] = {}
        carry = 0  # removed minus goal so far: shared-K/V rounding is diffused over later layers
        walker = _LazyWalk(model, structure, ids, cfg.batch_size)
        for layer in range(structure.n_layers):
            groups = [g for g in structure.layer_groups(layer) if layer not in target.skip_layers]
            key = _digest(chain, *decoder_layers(model)[layer].state_dict().values())
            path = root / f"{key}.safetensors"
            stored = _keys(path) if cfg.cache and path.is_file() else set()
            new: dict[str, Tensor] = {}
            for g in groups:
                h = None
                order = _tensor(path, f"{g.name}/order") if f"{g.name}/order" in stored else None
                if order is None:
                    h = walker.hessian(layer, g, cfg.damp)
                    order = new[f"{g.name}/order"] = removal_order(h, dense[g.name].to(h).T, g, cfg.obs_rounds).int()
                    diagnostics["built_modules"] += 1
                counts, centre = self._counts(g, order, goals[g.name] - carry, step, target)
                for c in counts:
                    name = f"{g.name}/{c}/weight"
                    if name not in stored and name not in new:
                        if h is None:
                            h = walker.hessian(layer, g, cfg.damp)
                        weight = refit_alive(h, dense[g.name].to(h).T, g, _alive(order, c)).T
                        new[name] = weight.to(dense[g.name].dtype).cpu().contiguous()
                        diagnostics["refit_levels"] += 1
                removed = [g.removed_params(_alive(order, c)) for c in counts]
                tensors = None if cfg.cache else new
                ladders[g.name] = Ladder(g, order, counts, removed, centre, file=path, tensors=tensors)
                carry += removed[centre] - goals[g.name]
            diagnostics["cached_layers"] += not new
            if new and cfg.cache:
                _add(path, new)
            chain = key
            if cfg.accumulate == "expectation":  # the next layer is measured on this one's centre levels
                chain = _digest(key, {g.name: ladders[g.name].counts[ladders[g.name].centre] for g in groups})
                for g in groups:
                    with torch.no_grad():
                        consumer_weight(model, g).copy_(ladders[g.name].load(ladders[g.name].centre)[1].to(
                            dense[g.name]))
        walker.close()
        return ladders

    def _counts(self, group: Group, order: Tensor, goal: float, step: float, target: Target) -> tuple[list[int], int]:
        """The ladder's counts, centre +- levels x step units, and the centre's index: the count whose removal
        comes closest to `goal` (by parameters: with shared K/V heads, which heads go decides them)."""
        n = group.n_units
        most = n - max(1, target.min_keep)
        if group.kv_params:
            centre = closest_count(goal, range(most + 1), lambda c: group.removed_params(_alive(order, c)))
        else:
            centre = min(most, max(0, round(goal / group.unit_params)))
        delta = max(1, round(step * n))
        counts = sorted({min(most, max(0, centre + j * delta)) for j in range(-self.config.levels,
                                                                               self.config.levels + 1)})
        return counts, counts.index(centre)

    # -- search -----------------------------------------------------------------------------------------------

    def _generation(self, model: nn.Module, ladders: dict[str, Ladder], parent: dict[str, int], apply,
                    search: Reference, stage_seqs: list[int], budget: int, tolerance: float,
                    rng: random.Random, draws: random.Random) -> tuple[dict[str, int], float]:
        cfg = self.config
        names = sorted(n for n, lad in ladders.items() if len(lad.counts) > 1)
        kinds: dict[str, list[str]] = {}
        for n in names:
            kinds.setdefault(ladders[n].group.kind, []).append(n)
        movable = [k for k, v in kinds.items() if len(v) > 1]

        def removed(state: dict[str, int]) -> int:
            return sum(lad.removed[state[n]] for n, lad in ladders.items())

        allowed = max(abs(removed(parent) - budget), tolerance)
        children: dict[tuple[int, ...], dict[str, int]] = {}
        attempts = 0
        while movable and len(children) < cfg.offspring and attempts < 50 * cfg.offspring:
            attempts += 1
            child = dict(parent)
            for _ in range(min(rng.randint(1, 4), rng.randint(1, 4))):
                pool = kinds[rng.choice(movable)]
                up = [n for n in pool if child[n] + 1 < len(ladders[n].counts)]
                down = [n for n in pool if child[n] > 0]
                if not up or not down:
                    continue
                a = rng.choice(up)
                b = rng.choice([n for n in down if n != a] or [a])
                if a == b:
                    continue
                child[a] += 1
                child[b] -= 1
            if child != parent and abs(removed(child) - budget) <= allowed:
                children.setdefault(tuple(child[n] for n in names), child)
        candidates = list(children.values())
        for i, (seqs, keep) in enumerate(zip(stage_seqs, cfg.stage_keep, strict=True)):
            if i == len(stage_seqs) - 1:
                candidates.append(parent)  # elitism: the parent competes in the last stage only
            rows = (sorted(draws.sample(range(len(search.ids)), seqs)) if cfg.stage_draw == "fresh"
                    else list(range(seqs)))
            scored = []
            for c in candidates:
                apply(c)
                scored.append((search.score(model, rows), len(scored), c))
            scored.sort(key=lambda t: (t[0], t[1]))
            candidates = [c for _, _, c in scored[:keep]]
        best = scored[0]
        return best[2], best[0]


def _applier(model: nn.Module, ladders: dict[str, Ladder]):
    """A function that writes a state's level weights into the model, touching only modules that changed."""
    loaded: dict[str, int] = {}

    def apply(state: dict[str, int]) -> None:
        for name, level in state.items():
            if loaded.get(name) != level:
                lad = ladders[name]
                weight = consumer_weight(model, lad.group)
                with torch.no_grad():
                    weight.copy_(lad.load(level)[1].to(weight))
                loaded[name] = level

    return apply


def _restore(model: nn.Module, structure: Structure, dense: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for g in structure.groups:
            consumer_weight(model, g).copy_(dense[g.name])


def _keys(path: Path) -> set[str]:
    """What a layer's cache file holds, without reading it (level weights are read one at a time, when applied)."""
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _tensor(path: Path, key: str) -> Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _add(path: Path, new: dict[str, Tensor]) -> None:
    """Add tensors to a layer's cache file: under a lock, what the file holds now plus `new`, written beside it and
    renamed into place (a killed run leaves the old file whole; two runs adding levels at once lose neither's)."""
    with locked(path.with_suffix(".lock")):
        held = {}
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                held = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        with replacing_file(path) as tmp:
            save_file(held | new, str(tmp))


class _LazyWalk:
    """Layer-input statistics on demand: the walk starts at the first layer that needs them (through the prefix as
    the model holds it now) and is never started when every level comes from the cache."""

    def __init__(self, model: nn.Module, structure: Structure, ids: Tensor, batch_size: int) -> None:
        self.args = (model, structure, ids)
        self.batch_size = batch_size
        self.it: Iterator[tuple[int, dict[str, Any]]] | None = None
        self.layer, self.stats = -1, {}

    def hessian(self, layer: int, group: Group, damp: float) -> Tensor:
        if self.it is None:
            self.it = walk(*self.args, gram=True, batch_size=self.batch_size)
        while self.layer < layer:
            self.layer, self.stats = next(self.it)
        return self.stats[group.name].hessian(damp)

    def close(self) -> None:
        if self.it is not None:
            self.it.close()
