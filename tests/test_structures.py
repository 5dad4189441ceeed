from __future__ import annotations

import pytest
import torch

from suite.errors import UnsupportedModel
from suite.model.structures import build_structure, full_structure, unit_sum
from suite.testing import tiny_model


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_prunable_params_are_exactly_the_projection_weights(model, granularity):
    s = full_structure(model, granularity)
    expected = 0
    for layer in model.model.layers:
        a = layer.self_attn
        expected += sum(_params(m) for m in (a.q_proj, a.k_proj, a.v_proj)) + a.o_proj.weight.numel()
        mlp = layer.mlp
        expected += _params(mlp.experts) if hasattr(mlp, "experts") else _params(mlp)
    assert s.prunable_params == expected
    assert s.total_params == _params(model)


def test_group_counts_follow_the_config(family):
    m = tiny_model(family)
    cfg = m.config
    kv = full_structure(m, "kv_group")
    qh = full_structure(m, "query_head")
    attn_kv = [g for g in kv.groups if g.kind == "attn"]
    attn_q = [g for g in qh.groups if g.kind == "attn"]
    assert {g.n_units for g in attn_kv} == {cfg.num_key_value_heads}
    assert {g.n_units for g in attn_q} == {cfg.num_attention_heads}
    assert kv.fingerprint != qh.fingerprint
    n_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    experts = [g for g in kv.groups if g.kind == "expert"]
    if n_experts:
        moe_layers = {g.layer for g in experts}
        assert len(experts) == n_experts * len(moe_layers)
    else:
        assert not experts


def test_qwen3_moe_dense_layers_are_mlp_groups():
    s = full_structure(tiny_model("qwen3_moe"))  # mlp_only_layers=[1]
    assert [g.kind for g in s.layer_groups(1)] == ["attn", "mlp"]
    assert {g.kind for g in s.layer_groups(0)} == {"attn", "expert"}


def test_unknown_family_is_refused_with_the_supported_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match=r"'gpt2'.*llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"):
        build_structure(gpt2)


def test_unit_sum_matches_a_direct_sum_of_each_units_weights():
    m = tiny_model("qwen2")  # q/k/v biases
    s = build_structure(m, "kv_group")
    g = s.groups[0]
    a = m.model.layers[0].self_attn
    sq = unit_sum(m, g, lambda p: p.detach() ** 2)
    torch.set_grad_enabled(False)
    hd, per_kv = g.head_dim, g.heads_per_unit
    for u in range(g.n_units):
        q = slice(u * per_kv * hd, (u + 1) * per_kv * hd)
        kv = slice(u * hd, (u + 1) * hd)
        direct = (a.q_proj.weight[q] ** 2).sum() + (a.q_proj.bias[q] ** 2).sum()
        direct += (a.k_proj.weight[kv] ** 2).sum() + (a.k_proj.bias[kv] ** 2).sum()
        direct += (a.v_proj.weight[kv] ** 2).sum() + (a.v_proj.bias[kv] ** 2).sum()
        direct += (a.o_proj.weight[:, q] ** 2).sum()
        assert float(sq[u]) == pytest.approx(float(direct), rel=1e-5)
    assert torch.all(sq > 0)
    torch.set_grad_enabled(True)


def test_units_choose_the_prunable_groups_and_default_to_experts_on_moe(family):
    """A target's unit kinds filter the groups (sparsity is a fraction of theirs); by default a model with experts
    prunes expert channels only (as the DDP paper does), a dense model attention and MLP channels; a kind the model
    lacks is refused by name."""
    from suite.errors import ConfigError

    m = tiny_model(family)
    full = full_structure(m)
    kinds = {g.kind for g in full.groups}
    default = build_structure(m)
    if "expert" in kinds:
        assert {g.kind for g in default.groups} == {"expert"} and default.units == ("expert",)
        both = build_structure(m, units=("attention", "expert"))
        assert {g.kind for g in both.groups} == {"attn", "expert"}
        assert both.prunable_params == sum(g.params for g in full.groups if g.kind in ("attn", "expert"))
    else:
        assert default.groups == full.groups and default.fingerprint == full.fingerprint
        with pytest.raises(ConfigError, match=r"target\.units: .* has no expert units"):
            build_structure(m, units=("expert",))
    attn = build_structure(m, units=("attention",))
    assert {g.kind for g in attn.groups} == {"attn"} and attn.fingerprint != full.fingerprint
