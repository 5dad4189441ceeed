from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from suite.errors import ConfigError, MaskMismatch, TargetUnreachable
from suite.model.masks import Masks, Target, select
from suite.model.structures import build_structure
from suite.testing import FAMILY_NAMES, tiny_model


@cache
def _structure(family: str, granularity: str = "kv_group"):
    return build_structure(tiny_model(family), granularity)


def _random_scores(structure, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.n_units, generator=gen) for g in structure.groups}


def _step(group, target) -> int:
    """Params of the largest single removal step a group can take."""
    units = target.round_to if group.kind != "attn" else 1
    return min(units, group.n_units) * group.unit_params + group.kv_params


def _tolerance(structure, target, uniform: bool) -> int:
    pruned = [g for g in structure.groups if g.layer not in target.skip_layers]
    if not uniform:
        return max(_step(g, target) for g in pruned)
    kinds = {g.kind for g in pruned}
    return max(sum(_step(g, target) for g in pruned if g.kind == k) for k in kinds)


CONSTRAINTS = list(itertools.product([False, True], [(), (0,)], [1, 2], [1, 8]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_targets_are_met_within_one_step_under_every_constraint(family, granularity, mode):
    s = _structure(family, granularity)
    scores = _random_scores(s)
    for (uniform, skip, min_keep, round_to), high in itertools.product(CONSTRAINTS, (False, True)):
        sparsity = (0.3 if skip else 0.5) if high else 0.2  # skipping 1 of 3 layers caps removal near 0.39
        t = Target(sparsity=sparsity, uniform=uniform, skip_layers=skip, min_keep=min_keep, round_to=round_to)
        case = f"{t} mode={mode}"
        masks = select(s, scores, t, mode=mode)
        gap = abs(masks.removed_params(s) - t.budget(s))
        assert gap <= _tolerance(s, t, uniform), case
        widths: dict[str, set[int]] = {}
        for g in s.groups:
            kept = int(masks.keep[g.name].sum())
            if g.layer in skip:
                assert kept == g.n_units, case
                continue
            assert kept >= min(min_keep, g.n_units), case
            if g.kind != "attn":
                assert kept % round_to == 0 or kept == g.n_units, case
            widths.setdefault(g.kind, set()).add(kept)
        if uniform:
            assert all(len(w) == 1 for w in widths.values()), case


def test_global_selection_is_an_oracle_on_hand_set_scores():
    s = _structure("llama")
    # every group gets scores equal to its unit index, except layer 2's MLP which is all-important
    scores = {g.name: torch.arange(g.n_units, dtype=torch.float64) for g in s.groups}
    scores["L02.mlp"] = torch.full((48,), 1e9, dtype=torch.float64)
    masks = select(s, scores, Target(sparsity=0.1), mode="global", normalize="raw")
    assert masks.keep["L02.mlp"].all()
    for g in s.groups:  # removed units are always the lowest-index ones of their group
        k = masks.keep[g.name]
        removed = int((~k).sum())
        assert not k[:removed].any() and k[removed:].all()


def test_per_layer_selection_removes_the_same_share_everywhere():
    s = _structure("llama")
    masks = select(s, _random_scores(s), Target(sparsity=0.5), mode="per_layer")
    for g in s.groups:
        share = g.removed_params(masks.keep[g.name]) / g.params
        assert share == pytest.approx(0.5, abs=_step(g, Target(sparsity=0.5)) / g.params)


def test_query_head_granularity_frees_a_kv_head_only_with_its_last_query_head():
    s = _structure("qwen3", "query_head")
    g = s.groups[0]  # 8 query heads over 4 K/V heads
    keep = torch.ones(8, dtype=torch.bool)
    keep[0] = False
    assert g.removed_params(keep) == g.unit_params
    keep[1] = False
    assert g.removed_params(keep) == 2 * g.unit_params + g.kv_params


def test_unreachable_target_and_bad_constraints_are_refused():
    s = _structure("llama")
    with pytest.raises(TargetUnreachable, match="unreachable"):
        select(s, _random_scores(s), Target(sparsity=0.6, skip_layers=(0, 1)))
    with pytest.raises(ConfigError, match="skip_layers: layer 7"):
        select(s, _random_scores(s), Target(sparsity=0.2, skip_layers=(7,)))
    for bad in ({"sparsity": 1.5}, {"sparsity": 0.0}, {"sparsity": 0.5, "min_keep": 0}, {"sparsity": 0.5, "x": 1}):
        with pytest.raises(ConfigError, match=r"^target\."):
            Target.parse(**bad)


def test_masks_save_load_roundtrip_and_refuse_another_structure(tmp_path):
    s = _structure("qwen3_moe")
    masks = select(s, _random_scores(s), Target(sparsity=0.3), mode="global")
    masks.scale = {s.groups[0].name: torch.linspace(0.5, 2.0, s.groups[0].n_units)}
    masks.meta = {"method": "test"}
    masks.save(tmp_path)
    back = Masks.load(tmp_path, s)
    assert back.fingerprint == s.fingerprint and back.meta == {"method": "test"}
    assert all(torch.equal(back.keep[n], masks.keep[n]) for n in masks.keep)
    assert torch.equal(back.scale[s.groups[0].name], masks.scale[s.groups[0].name])
    assert back.sparsity(s) == masks.sparsity(s)
    with pytest.raises(MaskMismatch, match="structure"):
        Masks.load(tmp_path, _structure("qwen3_moe", "query_head"))
    with pytest.raises(MaskMismatch, match="structure"):
        Masks.load(tmp_path, _structure("mixtral"))


def test_sparsity_counts_parameters_not_units():
    s = _structure("llama")
    masks = Masks.dense(s)
    masks.keep["L00.attn"][0] = False
    g = s.group("L00.attn")
    assert masks.sparsity(s) == g.unit_params / s.prunable_params
    assert masks.total_sparsity(s) == g.unit_params / s.total_params


def test_tied_scores_spread_over_layers_by_a_seeded_key():
    """Equal scores (hard-concrete log-alphas at their clamp) must not take the whole budget from layer 0; the
    tie-break is a seeded random key, so the same seed gives the same masks and another seed other ones."""
    from suite.model.masks import Target, select
    from suite.model.structures import build_structure
    from suite.testing import tiny_model

    s = build_structure(tiny_model("llama"))
    tied = {g.name: torch.full((g.n_units,), 4.6) for g in s.groups}
    a = select(s, tied, Target(sparsity=0.3), mode="global", normalize="raw", seed=0)
    layers_hit = {g.layer for g in s.groups if not a.keep[g.name].all()}
    assert len(layers_hit) > 1
    again = select(s, tied, Target(sparsity=0.3), mode="global", normalize="raw", seed=0)
    other = select(s, tied, Target(sparsity=0.3), mode="global", normalize="raw", seed=1)
    assert all(torch.equal(a.keep[n], again.keep[n]) for n in a.keep)
    assert any(not torch.equal(a.keep[n], other.keep[n]) for n in a.keep)
    # within a group too: the removed units of a tied group are not simply its first ones
    removed = [torch.nonzero(~a.keep[g.name]).flatten().tolist() for g in s.groups if not a.keep[g.name].all()]
    assert any(r != list(range(len(r))) for r in removed)
