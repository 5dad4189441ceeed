"""Layer-wise and gradient baselines cross-checked against straightforward independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.flap import column_metric
from suite.methods import capture
from suite.methods.layerwise import closest_removal, removal_goals
from suite.methods.obs import refit
from suite.methods.pruner import get_method
from suite.model.masks import Target
from suite.model.structures import build_structure
from suite.testing import tiny_calibration, tiny_model


def test_taylor_scores_equal_per_weight_autograd_products():
    model = tiny_model("llama").float()
    s = build_structure(model)
    calib = tiny_calibration(n=4, seq_len=16)
    cls = get_method("llm_pruner")
    scores = cls(cls.Config(batch_size=4)).scores(model, s, calib, seed=0)
    ids = calib.input_ids
    logits = model(ids).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
               mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = torch.autograd.grad(loss, weights)
    imp = [(w * g).abs().detach().double() for w, g in zip(weights, grads, strict=True)]
    q, k, v, o, gate, up, down = imp
    hd = attn.head_dim
    for j in range(s.group("L01.attn").n_units):  # MHA: a unit is one head
        rows = slice(j * hd, (j + 1) * hd)
        expected = q[rows].sum() + k[rows].sum() + v[rows].sum() + o[:, rows].sum()
        assert scores["L01.attn"][j] == pytest.approx(float(expected), rel=1e-4)
    expected = gate.sum(1) + up.sum(1) + down.sum(0)
    assert torch.allclose(scores["L01.mlp"], expected, rtol=1e-4)


def test_param_mix_adds_the_fisher_term():
    model = tiny_model("llama").float()
    s = build_structure(model)
    calib = tiny_calibration(n=4, seq_len=16)
    cls = get_method("llm_pruner")
    first = cls(cls.Config()).scores(model, s, calib, seed=0)
    mix = cls(cls.Config(taylor="param_mix")).scores(model, s, calib, seed=0)
    assert not torch.allclose(first["L00.mlp"], mix["L00.mlp"])


def test_flap_fluctuation_matches_numpy_on_the_captured_activations():
    model = tiny_model("qwen3").float().eval()
    s = build_structure(model)
    ids = tiny_calibration(n=6, seq_len=16).input_ids
    captured: dict[str, list[np.ndarray]] = {"attn": [], "mlp": []}
    layer = model.model.layers[2]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
                 lambda _m, a: captured["attn"].append(a[0].reshape(-1, a[0].shape[-1]).numpy().astype(np.float64))),
             layer.mlp.down_proj.register_forward_pre_hook(
                 lambda _m, a: captured["mlp"].append(a[0].reshape(-1, a[0].shape[-1]).numpy().astype(np.float64)))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    stats = dict(capture.walk(model, s, ids, sequential=False))[2]
    for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
        x = np.concatenate(captured[kind])
        w = lin.weight.detach().numpy().astype(np.float64)
        expected = x.var(axis=0, ddof=1) * (w**2).sum(axis=0)
        ours = column_metric("wifv", lin.weight, stats[f"L02.{kind}"]).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-12)


def test_flap_bias_keeps_the_first_layers_mean_output():
    model = tiny_model("llama").float().eval()
    s = build_structure(model)
    calib = tiny_calibration(n=8, seq_len=16)
    outputs: list[torch.Tensor] = []
    o_proj = model.model.layers[0].self_attn.o_proj
    hook = o_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(calib.input_ids)
        before = torch.cat(outputs).double().mean(0)
        outputs.clear()
        masks = get_method("flap")().prune(model, s, calib, Target(sparsity=0.5)).masks
        model(calib.input_ids)  # layer 0 sees the same inputs; its removed heads are replaced by their mean
        after = torch.cat(outputs).double().mean(0)
    hook.remove()
    assert not masks.keep["L00.attn"].all() and o_proj.bias is not None
    assert torch.allclose(before, after, atol=1e-5)


def test_refit_is_the_least_squares_solution():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    ours = refit(x.T @ x, b, kept)
    expected = torch.linalg.lstsq(x[:, kept], x @ b).solution
    assert torch.allclose(ours[kept], expected, atol=1e-9)
    assert ours[[1, 4, 5, 6, 9, 10]].abs().max() == 0


def test_slimgpt_reconstructs_better_than_zeroing_the_same_units():
    model = tiny_model("llama").float().eval()
    s = build_structure(model)
    calib = tiny_calibration(n=8, seq_len=16)
    ids = calib.input_ids
    stats = dict(capture.walk(model, s, ids, gram=True, sequential=False))[0]
    lin = model.model.layers[0].mlp.down_proj
    w0 = lin.weight.detach().clone()
    cls = get_method("slimgpt")
    g = s.group("L00.mlp")
    keep = cls(cls.Config(damp=0.0)).prune_group(model, g, stats["L00.mlp"], goal=20 * g.unit_params)
    assert int((~keep).sum()) == 20
    h = stats["L00.mlp"].hessian(0.0)

    def err(w):  # ||X W^T - X W0^T||^2 through H
        d = (w - w0).double().T
        return float(torch.trace(d.T @ h @ d))

    zeroed = w0.clone()
    zeroed[:, ~keep] = 0
    assert err(lin.weight.detach()) < 0.9 * err(zeroed)  # least squares: never worse, here clearly better


def test_removal_goals_follow_the_shared_selection_and_free_kv_heads_by_choice():
    model = tiny_model("qwen3")  # GQA: 2 query heads per K/V head
    s = build_structure(model, "query_head")
    goals = removal_goals(s, Target(sparsity=0.5), "per_layer")
    assert abs(sum(goals.values()) - Target(sparsity=0.5).budget(s)) <= max(g.unit_params + g.kv_params
                                                                          for g in s.groups)
    g = s.group("L00.attn")
    scattered = torch.arange(g.n_units).flip(0)  # remove from the end: K/V heads freed in pairs
    keep = closest_removal(g, scattered, goals[g.name])
    assert abs(g.removed_params(keep) - goals[g.name]) <= g.unit_params + g.kv_params


def test_gisp_emits_nested_masks_each_a_subset_of_the_next(tmp_path):
    from suite.model.masks import Masks
    from suite.run.pipeline import prune_model, write_outputs

    model = tiny_model("qwen3").float()
    cls = get_method("gisp")
    cfg = cls.Config(iterations=6, nested=[0.1, 0.2, 0.35])
    out = prune_model(model, cls(cfg), Target(sparsity=0.5), calibration=tiny_calibration(n=8, seq_len=16))
    result = out.result
    assert sorted(result.nested) == [0.1, 0.2, 0.35]
    chain = [result.nested[s] for s in (0.1, 0.2, 0.35)] + [result.masks]
    s = build_structure(tiny_model("qwen3"))
    sparsities = [m.sparsity(s) for m in chain]
    assert sparsities == sorted(sparsities) and abs(sparsities[-1] - 0.5) < 0.05
    for small, large in itertools.pairwise(chain):  # removed(small) is a subset of removed(large)
        for name in small.keep:
            assert not (~small.keep[name] & large.keep[name]).any(), name
    write_outputs(tmp_path, model, None, out)
    assert Masks.load(tmp_path / "nested" / "sp0.2", s).sparsity(s) == pytest.approx(sparsities[1])
    assert out.result.curves["sparsity"] == sorted(out.result.curves["sparsity"])


def test_an_expert_no_token_reached_still_has_a_usable_hessian():
    stats = capture.InputStats(6, gram=True)  # the router never picked this expert on the calibration set
    h = stats.hessian(0.01)
    assert torch.allclose(h, torch.eye(6, dtype=torch.float64) * 1.01)
    with pytest.raises(RuntimeError, match="not captured"):
        capture.InputStats(6).hessian(0.01)


def test_margin_gradients_are_those_of_right_minus_wrong_answer_nll():
    """The padded, weighted margin batch gives the gradient of mean NLL(right answers) - mean NLL(wrong answers),
    each answer scored as lm-eval does (sum over the continuation's tokens given the question)."""
    from suite.data.sources import embedded_corpus
    from suite.data.tasks import margin_set, sample_items
    from suite.methods.capture import gradients, prunable_parameters
    from suite.zoo import VOCAB, tokenizer

    tok = tokenizer()
    model = tiny_model("llama", vocab_size=VOCAB).float()
    s = build_structure(model)
    ids, weights = margin_set(tok, ["pb_self_attr"], 3, 256)
    ours = gradients(model, s, ids, batch_size=5, weights=weights)

    right, wrong = [], []
    for item in sample_items("pb_self_attr", embedded_corpus(), "train", 3):
        context = tok(item["question"], add_special_tokens=False)["input_ids"]
        for k, choice in enumerate(item["choices"]):
            whole = torch.tensor([tok(item["question"] + choice, add_special_tokens=False)["input_ids"][-256:]])
            logp = F.log_softmax(model(whole).logits[0, :-1].float(), -1)
            n = len(whole[0]) - len(context)
            nll = -logp[-n:].gather(1, whole[0, -n:, None]).sum()
            (right if k == item["label"] else wrong).append(nll)
    loss = torch.stack(right).mean() - torch.stack(wrong).mean()
    params = prunable_parameters(model, s)
    expected = torch.autograd.grad(loss, params)
    assert len(right) == 3 and len(wrong) == 9
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(ours.of(p), e, atol=1e-6, rtol=1e-4)


def test_gisp_margin_objective_uses_the_task_items_and_refuses_without_them():
    from suite.data.calibration import CalibrationSpec
    from suite.errors import ConfigError, DataError
    from suite.run.pipeline import prune_model
    from suite.zoo import VOCAB, tokenizer

    spec = CalibrationSpec(n=4, seq_len=64, valid_n=0, tasks=("pb_return", "pb_next_line"), task_items=2)
    cal = spec.build(tokenizer())
    assert cal.margin[0].shape == (16, 64) and "tasks:pb_return,pb_next_line:train" in cal.spec
    assert cal.content_hash != spec.model_copy(update={"tasks": ()}).build(tokenizer()).content_hash
    masks = {}
    for objective in ("lm", "margin"):
        model = tiny_model("qwen3", vocab_size=VOCAB).float()
        cfg = get_method("gisp").Config(iterations=3, objective=objective)
        out = prune_model(model, get_method("gisp")(cfg), Target(sparsity=0.4), calibration=cal)
        masks[objective] = out.result.masks
        assert abs(out.metrics["sparsity"] - 0.4) < 0.05
    assert any(not torch.equal(masks["lm"].keep[k], masks["margin"].keep[k]) for k in masks["lm"].keep)
    with pytest.raises(ConfigError, match=r"calibration\.tasks"):
        prune_model(tiny_model("qwen3"), get_method("gisp")(get_method("gisp").Config(objective="margin")),
                    Target(sparsity=0.4),
                    calibration=tiny_calibration())
    with pytest.raises(DataError, match="no train split here"):
        CalibrationSpec(tasks=("arc_easy",)).build(tokenizer())
