"""Týr-the-Pruner and MaskPrune beyond the shared contract: the supernet cache, the search's elitism, the OBS
removal path they share with SlimGPT, and MaskPrune's uniform, stock-loadable widths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from suite.methods.capture import InputStats
from suite.methods.mask_learning import sparsity_weights
from suite.methods.obs import removal_path
from suite.methods.pruner import get_method
from suite.model.compact import save_pruned, stock_widths
from suite.model.masks import Target
from suite.model.structures import build_structure
from suite.run.pipeline import compact_and_measure
from suite.testing import quick_config, tiny_calibration, tiny_model


def _prune(method, family="llama", sparsity=0.5, seed=0, **overrides):
    model = tiny_model(family)
    s = build_structure(model)
    cls = get_method(method)
    cfg = quick_config(cls).model_copy(update=overrides)
    result = cls(cfg).prune(model, s, tiny_calibration(n=16, seed=0), Target(sparsity=sparsity), seed=seed)
    return model, s, result


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_maskprune_keeps_one_width_per_kind_and_loads_with_stock_hf(family, tmp_path):
    model, s, result = _prune("maskprune", family, steps=20)
    for kind in {g.kind for g in s.groups}:
        assert len({int(result.masks.keep[g.name].sum()) for g in s.groups if g.kind == kind}) == 1, kind
    allowed = stock_widths(model.config, s)
    for g in s.groups:
        if g.kind in allowed:
            assert int(result.masks.keep[g.name].sum()) in allowed[g.kind]
    compact_and_measure(model, s, result.masks)
    save_pruned(model, tmp_path)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-5)


def test_stock_widths_follow_the_family_validators():
    llama = tiny_model("llama")  # hidden 64, 8 heads: Llama's config wants hidden % heads == 0
    assert stock_widths(llama.config, build_structure(llama))["attn"] == [1, 2, 4, 8]
    moe = tiny_model("qwen3_moe")  # experts of 24 channels: fused widths in multiples of 8
    widths = stock_widths(moe.config, build_structure(moe, units=("attention", "expert")))
    assert widths["expert"] == [8, 16, 24] and widths["attn"] == [1, 2, 3, 4]


def test_maskprune_widths_are_projected_back_onto_the_budget():
    from baselines.maskprune import MaskPruneRelaxation

    model = tiny_model("llama")
    s = build_structure(model)
    cfg = get_method("maskprune").Config()
    relax = MaskPruneRelaxation(cfg, s, list(s.groups), 0)
    weights, total = sparsity_weights(s, list(s.groups), cfg.weighting)

    def expected() -> float:
        keep = relax.keep_probability(0)
        return 1 - sum((weights[n] * keep[n].detach().double()).sum().item() for n in keep) / total

    with torch.no_grad():
        relax.width["attn"].fill_(0.9)
        relax.width["mlp"].fill_(0.8)
    relax.after_step(expected() - 0.5)
    assert abs(expected() - 0.5) < 1e-6  # float32 widths
    relax.after_step(expected() - 0.97)  # past what one unit per group allows: every width at its floor
    assert relax.width["attn"].item() == pytest.approx(1 / 8) and relax.width["mlp"].item() == pytest.approx(1 / 48)


def test_obs_path_snapshots_equal_single_count_runs():
    torch.manual_seed(0)
    model = tiny_model("llama")
    g = build_structure(model).group("L00.attn")
    stats = InputStats(64, gram=True)
    stats.update(torch.randn(200, 64))
    h = stats.hessian(0.01)
    b = torch.randn(64, 64, dtype=torch.float64)
    both = removal_path(h, b, g, [2, 5], rounds=16)
    for count in (2, 5):
        alone = removal_path(h, b, g, [count], rounds=16)[count]
        assert torch.equal(both[count].alive, alone.alive)
        assert torch.allclose(both[count].weight, alone.weight)
    assert (~both[5].alive).sum() == 5 and (both[2].alive | ~both[5].alive).all()  # nested


def test_tyr_second_run_loads_the_cached_supernet_and_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path))
    model_a, s, a = _prune("tyr", "qwen3")
    assert a.diagnostics["built_modules"] > 0 and a.diagnostics["cached_layers"] == 0
    assert list((tmp_path / "tyr").glob("*.safetensors"))
    model_b, _, b = _prune("tyr", "qwen3")
    assert b.diagnostics["built_modules"] == b.diagnostics["refit_levels"] == 0
    assert b.diagnostics["cached_layers"] == s.n_layers * get_method("tyr").Config().rounds
    assert all(torch.equal(a.masks.keep[n], b.masks.keep[n]) for n in a.masks.keep)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("accumulate", ["dense", "expectation"])
def test_tyr_supernet_cache_serves_other_sparsities(tmp_path, monkeypatch, accumulate):
    """One greedy removal order per module serves every ladder: under dense accumulation a run at another sparsity
    builds no order at all and refits only the levels it lacks; under Týr's expectation accumulation the first
    layer's inputs are still the dense ones, so its orders are reused. Either way the result equals a cold run."""
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "shared"))
    _, s, _ = _prune("tyr", "llama", sparsity=0.3, accumulate=accumulate)
    model, _, warm = _prune("tyr", "llama", sparsity=0.5, accumulate=accumulate)
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cold"))
    cold_model, _, cold = _prune("tyr", "llama", sparsity=0.5, accumulate=accumulate)
    first_layer = len(s.layer_groups(0))
    if accumulate == "dense":
        assert warm.diagnostics["built_modules"] == 0
    else:
        assert warm.diagnostics["built_modules"] <= cold.diagnostics["built_modules"] - first_layer
    assert warm.diagnostics["refit_levels"] < cold.diagnostics["refit_levels"]
    assert all(torch.equal(warm.masks.keep[n], cold.masks.keep[n]) for n in cold.masks.keep)
    for pa, pb in zip(model.parameters(), cold_model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_tyr_search_never_ends_worse_than_the_uniform_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path))
    _, s, result = _prune("tyr", "llama", rounds=1, generations=3)  # one round: elitism on the same tokens
    d = result.diagnostics
    assert d["fitness_searched"] <= d["fitness_uniform"]
    assert len(result.curves["fitness"]) == 3 and result.curves["fitness"] == sorted(result.curves["fitness"],
                                                                                        reverse=True)
    assert abs(result.masks.removed_params(s) - Target(sparsity=0.5).budget(s)) <= max(g.unit_params for g in s.groups)


def test_tyr_refuses_uniform_targets():
    model = tiny_model("llama")
    with pytest.raises(Exception, match="non-uniform"):
        get_method("tyr")().prune(model, build_structure(model), tiny_calibration(n=4), Target(sparsity=0.5,
                                                                                             uniform=True))
