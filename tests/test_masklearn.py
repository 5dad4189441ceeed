"""The mask-learning engine, DDP and hard-concrete: closed forms, equivalences and guards."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from baselines.hard_concrete import HardConcrete, HardConcreteConfig, keep_probability, sample
from ddp.ddp import DDP, DDPConfig, mu_at
from suite.masklearn import NumericalError, convergence_step, target_at
from suite.masks import Target
from suite.structures import build_structure
from suite.testing import tiny_calibration, tiny_model


def test_hard_concrete_sampling_matches_the_closed_form_expected_l0():
    cfg = HardConcreteConfig()
    log_alpha = torch.linspace(-4, 4, 9)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([sample(log_alpha, cfg, gen) for _ in range(40_000)])  # [N, 9]
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, keep_probability(log_alpha, cfg), atol=0.01)
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 1).any() and (samples == 0).any()
    # P(z = 0) at log_alpha = 0 is sigmoid(beta log(-l/r)) = sigmoid(-1.599) (METHODS.md B2)
    assert float(1 - keep_probability(torch.zeros(1), cfg)) == pytest.approx(1 / (1 + math.exp(1.5986)), abs=1e-3)


def test_ddp_soft_count_equals_the_hard_count_for_large_mu():
    """METHODS.md B1 appendix: with sigmoid(mu z) >= 1 - 1/(4K) on active units and <= 1/(4K) elsewhere, the soft
    count is within 1/2 of the number of z > 0, so it pins the l0 count exactly."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, generator=gen)
    z = torch.where(z.abs() < 0.05, torch.full_like(z, 0.05) * z.sign(), z)  # margin 0.05
    k = z.numel()
    mu = math.log(4 * k) / 0.05 + 1  # sharp enough for the 1/(4K) bounds at the margin
    soft = torch.sigmoid(mu * z.double()).sum()
    hard = (z > 0).sum()
    assert abs(float(soft) - int(hard)) <= 0.5 and round(float(soft)) == int(hard)
    assert abs(float(torch.sigmoid(1.0 * z).sum()) - int(hard)) > 0.5  # and at mu = 1 it does not


@pytest.mark.parametrize("schedule", ["linear", "geometric", "cosine"])
def test_mu_schedules_hit_their_endpoints(schedule):
    cfg = DDPConfig(schedule=schedule, mu_start=2.0, mu_end=50.0, steps=30)
    mus = [mu_at(s, 30, cfg) for s in range(30)]
    assert mus[0] == pytest.approx(2.0) and mus[-1] == pytest.approx(50.0)
    assert all(a <= b for a, b in itertools.pairwise(mus))


def test_target_warmup_and_convergence_step():
    assert [target_at(s, 100, 0.5, 0.2) for s in (0, 10, 50)] == [0, 0.25, 0.5]
    assert target_at(0, 100, 0.5, 0.0) == 0.5
    assert convergence_step([b"a", b"b", b"b", b"b"]) == 2
    assert convergence_step([b"a", b"b", b"a"]) == 3
    assert convergence_step([b"x"] * 5) == 1


def _prune(cls, cfg, family="qwen3", sparsity=0.5, seed=3, granularity="kv_group"):
    model = tiny_model(family)
    s = build_structure(model, granularity)
    return s, cls(cfg).prune(model, s, tiny_calibration(n=16), Target(sparsity=sparsity), seed=seed)


def test_ddp_is_bit_for_bit_deterministic_and_records_its_diagnostics():
    cfg = DDPConfig(steps=15, batch_size=4, valid_batches=1)
    s, a = _prune(DDP, cfg)
    _, b = _prune(DDP, cfg)
    for n in a.masks.keep:
        assert torch.equal(a.masks.keep[n], b.masks.keep[n]) and torch.equal(a.masks.scale[n], b.masks.scale[n])
    assert a.curves == b.curves
    assert len(a.curves["mu"]) == 15 and a.curves["mu"][-1] == pytest.approx(100.0)
    for key in ("mismatch", "convergence_step", "tokens_seen", "effective_sparsity", "topped_up_units"):
        assert key in a.diagnostics
    assert a.diagnostics["tokens_seen"] == 15 * 4 * 16
    assert abs(a.masks.sparsity(s) - 0.5) < 0.05


def test_hard_concrete_final_mask_uses_the_deterministic_soft_values():
    cfg = HardConcreteConfig(steps=10, batch_size=4, valid_batches=1)
    _, r = _prune(HardConcrete, cfg)
    for scale in r.masks.scale.values():
        assert torch.all((scale > 0) & (scale < 1))  # Sheared: kept units keep their soft value, not 1
    assert "mismatch" in r.diagnostics and r.curves["temperature"][0] == pytest.approx(2 / 3)


def test_lambdas_rise_by_ascent_when_the_model_is_too_dense():
    cfg = DDPConfig(steps=10, batch_size=4, valid_batches=1, lr=1e-4)  # gates barely move: s_hat stays ~0 < t
    _, r = _prune(DDP, cfg)
    gap = [e - t for e, t in zip(r.curves["expected_sparsity"], r.curves["target"], strict=True)]
    assert all(g < 0 for g in gap)
    assert r.curves["lambda1"][-1] < 0 < r.curves["lambda2"][-1]  # d/d lambda1 = gap < 0, d/d lambda2 = gap^2 > 0


def test_nan_guard_stops_with_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    s = build_structure(model)
    with pytest.raises(NumericalError, match="loss became nan at step 0"):
        cfg = DDPConfig(steps=3, batch_size=4, valid_batches=1)
        DDP(cfg).prune(model, s, tiny_calibration(n=16), Target(sparsity=0.3))


def test_skip_layers_and_uniform_widths_are_honoured_by_mask_learning():
    cfg = DDPConfig(steps=8, batch_size=4, valid_batches=1)
    model = tiny_model("llama")
    s = build_structure(model)
    t = Target(sparsity=0.3, skip_layers=(0,), uniform=True)
    r = DDP(cfg).prune(model, s, tiny_calibration(n=16), t)
    assert all(r.masks.keep[g.name].all() for g in s.layer_groups(0))
    widths = {(g.kind, int(r.masks.keep[g.name].sum())) for g in s.groups if g.layer != 0}
    assert len({k for k, _ in widths}) == len(widths)  # one width per kind
