"""compact(gated model) == gated model, for every family, granularity, sparsity and shape (issue: Core)."""

from __future__ import annotations

import pytest
import torch

from suite.model.compact import compact, load_pruned, save_pruned
from suite.model.gates import Gates
from suite.model.masks import Masks, Target, select
from suite.model.modules import RaggedExperts, RepeatedHeadsLinear
from suite.model.structures import build_structure
from suite.testing import VOCAB, tiny_model

TOL = 1e-4


def _random_masks(structure, sparsity: float, seed: int, scaled: bool = True, **target) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.n_units, generator=gen) for g in structure.groups}
    masks = select(structure, scores, Target(sparsity=sparsity, **target), mode="global", normalize="raw")
    if scaled:  # learned gate values that compaction must fold into the weights
        masks.scale = {g.name: 0.5 + torch.rand(g.n_units, generator=gen) for g in structure.groups}
    return masks


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding
    attention[2, :7] = 0
    return ids, attention


def _outputs(model, ids, attention):
    with torch.no_grad():
        plain = model(ids).logits
        padded = model(ids, attention_mask=attention).logits
        gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return plain, padded * attention[..., None], gen.sequences, torch.stack(gen.logits)


@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_compact_equals_gated(family, granularity, sparsity):
    model = tiny_model(family)
    s = build_structure(model, granularity)
    masks = _random_masks(s, sparsity, seed=int(sparsity * 10))
    widths = {g.kind: set() for g in s.groups}
    for g in s.groups:
        widths[g.kind].add(int(masks.keep[g.name].sum()))
    assert any(len(w) > 1 for w in widths.values()), "masks should give non-uniform widths"
    ids, attention = _inputs()
    with Gates(model, s) as gates:
        gates.apply_masks(masks)
        gated = _outputs(model, ids, attention)
    layout = compact(model, s, masks)
    compacted = _outputs(model, ids, attention)
    for name, a, b in zip(("logits", "padded logits", "sequences", "generate logits"), gated, compacted, strict=True):
        assert a.shape == b.shape, name
        assert (a.float() - b.float()).abs().max() <= TOL, name
    assert sum(p.numel() for p in model.parameters()) == s.total_params - masks.removed_params(s)
    assert not layout["stock"]


def test_uneven_query_heads_per_kv_group_stay_exact():
    model = tiny_model("qwen3")  # 8 query heads over 4 K/V heads
    s = build_structure(model, "query_head")
    masks = Masks.dense(s)
    masks.keep["L00.attn"] = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)  # 2, 1, 0, 1 per group
    ids, _ = _inputs()
    with Gates(model, s) as gates, torch.no_grad():
        gates.apply_masks(masks)
        gated = model(ids).logits
    compact(model, s, masks)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, RepeatedHeadsLinear)
    assert attn.k_proj.weight.shape[0] == 3 * 8  # three K/V heads stored once each
    assert attn.k_proj.head_index == [0, 0, 1, 2] and attn.num_key_value_groups == 1
    with torch.no_grad():
        assert (model(ids).logits - gated).abs().max() <= TOL


def test_gates_remove_cleanly(family):
    model = tiny_model(family)
    ids, _ = _inputs()
    with torch.no_grad():
        before = model(ids).logits
    modules_before = [type(m) for m in model.modules()]
    s = build_structure(model)
    gates = Gates(model, s)
    gates.apply_masks(_random_masks(s, 0.5, 1))
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-3  # the gates act
    gates.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_soft_gates_are_differentiable(family):
    model = tiny_model(family)
    model.requires_grad_(False)
    s = build_structure(model)
    z = {g.name: torch.ones(g.n_units, requires_grad=True) for g in s.groups}
    ids, _ = _inputs()
    with Gates(model, s) as gates:
        gates.set_all(z)
        model(ids, labels=ids).loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in z.values())


@pytest.mark.parametrize("uniform", [False, True])
def test_save_reload_is_identical_on_both_load_paths(tmp_path, family, uniform):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    s = build_structure(model, "query_head" if not uniform else "kv_group")
    target = {"uniform": True, "round_to": 8} if uniform else {}
    masks = _random_masks(s, 0.5, 3, **target)
    compact(model, s, masks)
    n_heads = model.model.layers[0].self_attn.q_proj.out_features // 8
    # HF's Llama config validator refuses a hidden size that is not a multiple of the head count
    assert model.config.prunebench_layout["stock"] == (uniform and (family != "llama" or 64 % n_heads == 0))
    uniform = model.config.prunebench_layout["stock"]
    save_pruned(model, tmp_path)
    ids, attention = _inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=attention).logits
        got = load_pruned(tmp_path)(ids, attention_mask=attention).logits
        assert torch.equal(got, want)
        if uniform:
            stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            assert torch.equal(stock(ids, attention_mask=attention).logits, want)
            assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in model.parameters())


def test_unaligned_uniform_expert_widths_use_the_ragged_module():
    """HF's grouped_mm kernel needs 8-aligned fused widths; 13 of 24 channels must still run and stay exact."""
    model = tiny_model("qwen3_moe")
    s = build_structure(model)
    masks = Masks.dense(s)
    for g in s.groups:
        if g.kind == "expert":
            masks.keep[g.name][13:] = False
    ids, _ = _inputs()
    with Gates(model, s) as gates, torch.no_grad():
        gates.apply_masks(masks)
        gated = model(ids).logits
    layout = compact(model, s, masks)
    assert isinstance(model.model.layers[0].mlp.experts, RaggedExperts) and not layout["stock"]
    with torch.no_grad():
        assert (model(ids).logits - gated).abs().max() <= TOL


def test_load_refuses_a_checkpoint_with_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from suite.errors import PruneBenchError

    model = tiny_model("llama")
    s = build_structure(model, "query_head")
    compact(model, s, _random_masks(s, 0.3, 5))
    save_pruned(model, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights.pop(next(k for k in weights if "down_proj" in k))
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((RuntimeError, PruneBenchError), match=r"[Mm]issing"):
        load_pruned(tmp_path)


def test_a_tied_non_uniform_checkpoint_stores_the_stock_embedding_key(tmp_path):
    """The real-model review: a pruned model with tied embeddings stored its one matrix only as `lm_head.weight`.
    It is stored once, under `model.embed_tokens.weight` (the key stock Llama files, GGUF converters and serving
    engines read); prunebench's loader and stock `from_pretrained` (its shipped code) restore it tied and exact."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", tie_word_embeddings=True)
    s = build_structure(model, "query_head")
    compact(model, s, _random_masks(s, 0.4, 2))
    assert not model.config.prunebench_layout["stock"]
    save_pruned(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    ids, attention = _inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=attention).logits
        for loaded in (load_pruned(tmp_path),
                       AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()):
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
            assert torch.equal(loaded(ids, attention_mask=attention).logits, want)
