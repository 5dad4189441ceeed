"""The contract every registered method must keep, on every family: runs, hits the target, compact == gated,
and the same seed gives the same masks. A new method joins this matrix by being registered."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from suite.methods.pruner import get_method, methods
from suite.model.compact import load_pruned, save_pruned, stock_widths, verified_compact
from suite.model.masks import Target
from suite.model.structures import build_structure
from suite.testing import quick_config, tiny_calibration, tiny_model

METHODS = sorted(methods())


def _run(method: str, family: str, granularity: str, sparsity: float, seed: int = 0):
    model = tiny_model(family)
    s = build_structure(model, granularity)
    cls = get_method(method)
    calibration = tiny_calibration(n=16, seed=0) if cls.needs_calibration else None
    result = cls(quick_config(cls)).prune(model, s, calibration, Target(sparsity=sparsity), seed=seed)
    return model, s, result


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_method_contract(method, family, granularity, tmp_path):
    model, s, result = _run(method, family, granularity, 0.5)
    masks = result.masks
    unit = max(g.unit_params + g.kv_params for g in s.groups)
    if method == "maskprune":  # one stock width per kind in every layer: the budget is met to one unit per layer,
        unit *= s.n_layers  # or to half a step between stock widths taken in every group of a kind
        for kind, widths in stock_widths(model.config, s).items():
            step = max(b - a for a, b in itertools.pairwise([0, *widths]))
            unit = max(unit, step * sum(g.unit_params for g in s.groups if g.kind == kind) // 2)
    assert abs(masks.removed_params(s) - Target(sparsity=0.5).budget(s)) <= unit
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    added = sum(p.numel() for p in model.parameters()) - s.total_params  # only FLAP adds (its biases)
    assert added == 0 or method == "flap"
    assert verified_compact(model, s, masks, ids) <= 1e-4
    assert sum(p.numel() for p in model.parameters()) == s.total_params - masks.removed_params(s) + added
    save_pruned(model, tmp_path)  # whatever the method changed (refits, added biases) survives a reload
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_masks(method):
    _, _, a = _run(method, "qwen3", "kv_group", 0.3, seed=7)
    _, _, b = _run(method, "qwen3", "kv_group", 0.3, seed=7)
    assert all(torch.equal(a.masks.keep[n], b.masks.keep[n]) for n in a.masks.keep)


def test_random_depends_on_the_seed_and_magnitude_keeps_large_units():
    _, _, a = _run("random", "llama", "kv_group", 0.5, seed=1)
    _, _, b = _run("random", "llama", "kv_group", 0.5, seed=2)
    assert any(not torch.equal(a.masks.keep[n], b.masks.keep[n]) for n in a.masks.keep)
    model = tiny_model("llama")
    with torch.no_grad():  # make channel 5 of layer 0 tiny: magnitude must drop it first
        mlp = model.model.layers[0].mlp
        for w in (mlp.gate_proj.weight[5], mlp.up_proj.weight[5], mlp.down_proj.weight[:, 5]):
            w.mul_(1e-3)
    s = build_structure(copy.deepcopy(model))
    masks = get_method("magnitude")().prune(model, s, None, Target(sparsity=0.05)).masks
    assert not masks.keep["L00.mlp"][5]


@pytest.mark.parametrize("method", METHODS)
def test_weights_changed_is_exact(method, family):
    """`weights_changed` (a run stores a compact checkpoint only when it is true) says whether the method changed a
    weight the compact model keeps, bit for bit: a layer-wise method that zeroes the consumer columns of the units it
    removes (Wanda-sp, GISP) changed nothing that survives; a refit (SlimGPT) or an added bias (FLAP) did."""
    from suite.methods.capture import consumer_weight, unit_columns
    from suite.run.pipeline import kept_weights_changed, weights_digest

    model = tiny_model(family)
    s = build_structure(model, "kv_group")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    digest = weights_digest(model, s)
    cls = get_method(method)
    calibration = tiny_calibration(n=16, seed=0) if cls.needs_calibration else None
    masks = cls(quick_config(cls)).prune(model, s, calibration, Target(sparsity=0.5), seed=0).masks
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    for g in s.groups:  # what compaction drops: the removed units' consumer columns, whatever was written there
        removed = unit_columns(g)[~masks.keep[g.name]].flatten()
        view = consumer_weight(model, g)
        for state in (before, after):
            for name, p in model.named_parameters():
                if p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr() and name in state:
                    offset = view.storage_offset() - p.storage_offset()
                    flat = state[name].reshape(-1)
                    cols = flat.as_strided(view.shape, view.stride(), offset)
                    cols[:, removed] = 0
    expected = before.keys() != after.keys() or any(not torch.equal(before[n], after[n]) for n in before)
    assert kept_weights_changed(digest, weights_digest(model, s), s, masks) == expected
    if method in ("wanda_sp", "magnitude", "random", "gisp", "llm_pruner"):
        assert not expected  # these only choose units: nothing they keep may change
