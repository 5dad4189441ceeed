"""Model anatomy: the prunable unit groups of a decoder-only Hugging Face model.

A Structure lists, per decoder layer, one group of attention units, one group of MLP channels (dense layers) or
one group of channels per expert (MoE layers). Shapes are read from the live modules rather than the config, so
the same code describes a dense checkpoint and one that was already pruned to non-uniform widths.

Sparsity counts parameters (docs/methods.md): an attention unit owns its q/k/v rows (and biases) and its o_proj
columns; a channel owns one gate row, one up row and one down column. Under `query_head` granularity a K/V head is
shared by several units and is freed only when all of them go, which `Group.removed_params` accounts for exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from suite.errors import ConfigError, UnsupportedModel
from suite.hashing import digest
from suite.model.families import FAMILIES, AttentionProjections, Family, family_of
from suite.model.modules import RepeatedHeadsLinear, expert_weights, expert_widths, unwrap

Granularity = Literal["kv_group", "query_head"]
GRANULARITIES: tuple[str, ...] = ("kv_group", "query_head")
UnitKind = Literal["attention", "mlp", "expert"]
UNIT_KINDS: tuple[str, ...] = ("attention", "mlp", "expert")
KIND_OF_UNIT = {"attention": "attn", "mlp": "mlp", "expert": "expert"}  # a target's unit kind -> Group.kind


@dataclass(frozen=True)
class Group:
    """The prunable units of one kind in one place: a layer's attention, its MLP, or one expert.

    unit_params: parameters removed with one unit. For `query_head` attention this excludes the shared K/V head,
    whose `kv_params` are freed once all `heads_per_kv` query heads sharing it are removed.
    """

    name: str
    layer: int
    kind: Literal["attn", "mlp", "expert"]
    n_units: int
    unit_params: int
    expert: int | None = None
    head_dim: int = 0
    heads_per_unit: int = 1  # attn: query heads gated together by one unit (the KV-group size under kv_group)
    heads_per_kv: int = 1  # attn/query_head: query heads sharing one K/V head
    kv_params: int = 0

    @property
    def params(self) -> int:
        """All prunable parameters of this group."""
        n_kv = self.n_units // self.heads_per_kv if self.kv_params else 0
        return self.n_units * self.unit_params + n_kv * self.kv_params

    def removed_params(self, keep: Tensor) -> int:
        """Parameters removed when only the units where `keep` [n_units] is True survive."""
        removed = int((~keep).sum()) * self.unit_params
        if self.kv_params:
            alive = keep.view(-1, self.heads_per_kv).any(dim=1)
            removed += int((~alive).sum()) * self.kv_params
        return removed


@dataclass(frozen=True)
class Part:
    """One tensor's share of a group's units: `param[index]` laid out as n_units blocks along `dim`."""

    param: nn.Parameter
    index: tuple
    dim: int

    def units(self, tensor: Tensor, n_units: int) -> Tensor:
        """`tensor` (the parameter or its gradient, same shape) viewed as [n_units, -1]."""
        sub = tensor[self.index].movedim(self.dim, 0)
        return sub.reshape(n_units, -1)


@dataclass(frozen=True)
class Structure:
    """The prunable anatomy of one model under one attention granularity."""

    family: str
    granularity: str
    n_layers: int
    groups: tuple[Group, ...]
    total_params: int
    units: tuple[str, ...] = UNIT_KINDS  # the unit kinds whose groups are listed (the target's `units`)

    @property
    def prunable_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def fingerprint(self) -> str:
        """Identity of the anatomy: masks made for one structure are refused on another."""
        rows = [[g.name, g.n_units, g.unit_params, g.kv_params, g.heads_per_kv] for g in self.groups]
        blob = json.dumps([self.family, self.granularity, self.total_params, rows])
        return digest(blob)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def layer_groups(self, layer: int) -> list[Group]:
        return [g for g in self.groups if g.layer == layer]

    def family_info(self) -> Family:
        return FAMILIES[self.family]


def _linear_params(lin: nn.Linear, rows: int = 0, cols: int = 0) -> int:
    """Parameters in `rows` output rows (weight + bias) and `cols` input columns of a Linear."""
    per_row = lin.in_features + (1 if lin.bias is not None else 0)
    return rows * per_row + cols * lin.out_features


def _attention_group(attn: nn.Module, proj: AttentionProjections, layer: int, granularity: str) -> Group:
    hd = attn.head_dim
    if isinstance(proj.k, RepeatedHeadsLinear):
        raise UnsupportedModel(
            f"layer {layer}: re-pruning a checkpoint whose query heads share K/V heads unevenly is not supported"
        )
    n_heads = proj.q.out_features // hd
    n_kv = proj.k.out_features // hd
    if n_heads % n_kv:
        raise UnsupportedModel(f"layer {layer}: {n_heads} query heads do not split over {n_kv} K/V heads")
    per_kv = n_heads // n_kv
    q_head = _linear_params(proj.q, rows=hd) + _linear_params(proj.o, cols=hd)
    kv_head = _linear_params(proj.k, rows=hd) + _linear_params(proj.v, rows=hd)
    name = f"L{layer:02d}.attn"
    if granularity == "kv_group":
        return Group(name, layer, "attn", n_kv, per_kv * q_head + kv_head, head_dim=hd, heads_per_unit=per_kv)
    return Group(name, layer, "attn", n_heads, q_head, head_dim=hd, heads_per_kv=per_kv, kv_params=kv_head)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown attention granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    return granularity


def default_units(kinds: Iterable[str]) -> tuple[str, ...]:
    """The unit kinds pruned when a target names none: expert channels only on a model with experts (as the DDP
    paper prunes MoE models), attention and MLP channels otherwise."""
    return ("expert",) if "expert" in set(kinds) else ("attention", "mlp")


def build_structure(model: nn.Module, granularity: str = "kv_group", units: Iterable[str] | None = None) -> Structure:
    """Read the prunable units of `model`, keeping the groups of the unit kinds in `units` (None: the model's
    default, `default_units`); refuse unknown families with the list of supported ones, and a unit kind the model
    does not have with the ones it has."""
    full = full_structure(model, granularity)
    present = unit_kinds(full)
    chosen = default_units(present) if units is None else tuple(k for k in UNIT_KINDS if k in set(units))
    missing = [k for k in chosen if k not in present]
    if missing:
        raise ConfigError(f"target.units: this {full.family} model has no {' or '.join(missing)} units "
                          f"(it has {', '.join(present)})")
    kinds = {KIND_OF_UNIT[k] for k in chosen}
    return replace(full, groups=tuple(g for g in full.groups if g.kind in kinds), units=chosen)


def unit_kinds(structure: Structure) -> tuple[str, ...]:
    """The unit kinds (attention, mlp, expert) that `structure` has groups of."""
    return tuple(k for k in UNIT_KINDS if any(g.kind == KIND_OF_UNIT[k] for g in structure.groups))


def full_structure(model: nn.Module, granularity: str = "kv_group") -> Structure:
    """Every unit group of `model`, whatever a target would prune (what `inspect` shows)."""
    check_granularity(granularity)
    family = family_of(model)
    groups: list[Group] = []
    layers = family.layers(model)
    for i, layer in enumerate(layers):
        groups.append(_attention_group(family.attention(layer), family.attention_projections(layer), i, granularity))
        moe, mlp = family.moe(layer), family.mlp_projections(layer)
        if moe is not None:
            if family.shared_expert(layer) is not None:
                raise UnsupportedModel(f"layer {i}: MoE layers with a shared expert are not supported")
            hidden = family.router_width(layer)
            for e, width in enumerate(expert_widths(moe.experts)):
                groups.append(Group(f"L{i:02d}.expert{e:03d}", i, "expert", width, 3 * hidden, expert=e))
        elif mlp is not None:
            per_channel = (
                _linear_params(mlp.gate, rows=1) + _linear_params(mlp.up, rows=1) + _linear_params(mlp.down, cols=1)
            )
            groups.append(Group(f"L{i:02d}.mlp", i, "mlp", mlp.down.in_features, per_channel))
        else:
            raise UnsupportedModel(f"layer {i}: unrecognised MLP module {type(family.mlp(layer)).__name__}")
    full = Structure(family.model_type, granularity, len(layers), tuple(groups), param_count(model))
    return replace(full, units=unit_kinds(full))  # the kinds it has, not every kind there is


def param_count(model: nn.Module, compute_only: bool = False) -> int:
    """Every parameter of `model` (embeddings and head included): what `params_*` numbers count. `compute_only`:
    all but the input embedding lookup, the parameters that cost a multiply-add per token."""
    skip = model.get_input_embeddings().weight if compute_only else None
    return sum(p.numel() for p in model.parameters() if p is not skip)


def group_parts(model: nn.Module, group: Group) -> Iterator[Part]:
    """Every parameter slice owned by the group's units, each viewable as [n_units, -1].

    Under `query_head` the shared K/V heads belong to no single unit and are left out (as GISP does for scores).
    """
    family = family_of(model)
    layer = family.layers(model)[group.layer]
    if group.kind in ("attn", "mlp"):
        if group.kind == "attn":
            proj = family.attention_projections(layer)
            linears = [(proj.q, 0), (proj.o, 1)]
            if not group.kv_params:  # kv_group: each unit owns its K/V head
                linears += [(proj.k, 0), (proj.v, 0)]
        else:
            mlp = family.mlp_projections(layer)
            linears = [(mlp.gate, 0), (mlp.up, 0), (mlp.down, 1)]
        for lin, dim in linears:
            yield Part(lin.weight, (slice(None), slice(None)), dim)
            if lin.bias is not None and dim == 0:
                yield Part(lin.bias, (slice(None),), 0)
    else:
        experts = unwrap(family.moe(layer).experts)
        e = group.expert
        if hasattr(experts, "gate_up_proj"):
            width = group.n_units
            yield Part(experts.gate_up_proj, (e, slice(0, width)), 0)
            yield Part(experts.gate_up_proj, (e, slice(width, 2 * width)), 0)
            yield Part(experts.down_proj, (e, slice(None), slice(None)), 1)
        else:
            gate, up, down = expert_weights(experts, e)
            yield Part(gate, (slice(None), slice(None)), 0)
            yield Part(up, (slice(None), slice(None)), 0)
            yield Part(down, (slice(None), slice(None)), 1)


def unit_sum(model: nn.Module, group: Group, value: Callable[[nn.Parameter], Tensor]) -> Tensor:
    """Per-unit sum [n_units] of `value(param)` (same shape as param) over every parameter slice of the group.

    Scores are sums of element-wise terms over a unit's weights: magnitude passes `p ** 2`, Taylor `|p * p.grad|`.
    """
    total = torch.zeros(group.n_units, dtype=torch.float64)
    for part in group_parts(model, group):
        total += part.units(value(part.param), group.n_units).double().sum(1).cpu()
    return total
