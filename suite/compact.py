"""Physically remove pruned units, and save/reload pruned checkpoints.

Compaction owns every attribute fix a smaller module needs (head counts, widths, K/V sharing), so no method ever
patches a Hugging Face module. Per-unit scales are folded into the consumer weights first (o_proj columns,
down_proj columns), which makes the compact model compute what the gated model computed.

A model whose layers all kept one shape is written in the stock format with the reduced sizes in config.json, so
`AutoModelForCausalLM.from_pretrained` loads it. Any other shape is written with its per-layer layout in
config.json (`prunebench_layout`) and loads through `load_pruned`, which rebuilds every module at its pruned shape
and then loads the weights strictly: a weight is never silently re-initialised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from suite.errors import ConfigError, ModelLoadError
from suite.gates import Gates
from suite.masks import Masks
from suite.modules import RaggedExperts, RepeatedHeadsLinear, expert_weights
from suite.structures import FAMILIES, Group, Structure, decoder_layers

LAYOUT_KEY = "prunebench_layout"
# HF's grouped_mm expert kernels need 16-byte aligned strides: a fused width must be a multiple of 8 (bf16);
# other uniform widths use RaggedExperts, so a stock-loadable MoE checkpoint always runs (round_to: 8 keeps it).
FUSED_ALIGN = 8
WEIGHTS = "model.safetensors"


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def _rows(lin: nn.Linear, idx: Tensor) -> tuple[Tensor, Tensor | None]:
    return lin.weight[idx].clone(), None if lin.bias is None else lin.bias[idx].clone()


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices [len(heads) * head_dim] of the given heads in a q/k/v projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _kv_sharing(counts: list[int]) -> tuple[int, list[int] | None]:
    """Query heads per K/V slot and, when kept K/V heads serve different numbers of query heads, the slot map."""
    per_slot = math.gcd(*counts)
    repeats = [c // per_slot for c in counts]
    if all(r == 1 for r in repeats):
        return per_slot, None
    return per_slot, [h for h, r in enumerate(repeats) for _ in range(r)]


def _install_attention(attn: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, groups: int):
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = q, k, v, o
    attn.num_key_value_groups = groups  # the only per-layer head count HF reads at run time (STACK.md §2)


def _kv_linear(weight: Tensor, bias: Tensor | None, head_dim: int, kv_index: list[int] | None) -> nn.Linear:
    if kv_index is None:
        return _linear(weight, bias)
    lin = RepeatedHeadsLinear(weight.shape[1], weight.shape[0] // head_dim, head_dim, kv_index, bias is not None)
    lin.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


def _compact_attention(attn: nn.Module, group: Group, keep: Tensor, scale: Tensor | None) -> dict[str, Any]:
    hd = group.head_dim
    head_keep = keep.repeat_interleave(group.heads_per_unit)  # [n_heads]
    n_heads = head_keep.numel()
    n_kv = attn.k_proj.out_features // hd
    counts = head_keep.view(n_kv, n_heads // n_kv).sum(1)
    if not head_keep.any():
        raise ConfigError(f"layer {group.layer} keeps no attention unit; compaction needs at least one (min_keep)")
    if scale is not None:
        attn.o_proj.weight.mul_(scale.repeat_interleave(group.heads_per_unit * hd).to(attn.o_proj.weight)[None, :])
    q_rows = _head_rows(head_keep.nonzero().squeeze(1), hd)
    kv_rows = _head_rows((counts > 0).nonzero().squeeze(1), hd)
    per_slot, kv_index = _kv_sharing(counts[counts > 0].tolist())
    o_weight = attn.o_proj.weight[:, q_rows].clone()
    o_bias = None if attn.o_proj.bias is None else attn.o_proj.bias.clone()
    _install_attention(
        attn,
        _linear(*_rows(attn.q_proj, q_rows)),
        _kv_linear(*_rows(attn.k_proj, kv_rows), hd, kv_index),
        _kv_linear(*_rows(attn.v_proj, kv_rows), hd, kv_index),
        _linear(o_weight, o_bias),
        per_slot,
    )
    return {"q_heads": len(q_rows) // hd, "kv_heads": len(kv_rows) // hd, "kv_index": kv_index, "head_dim": hd,
            "o_bias": o_bias is not None}


def _compact_mlp(mlp: nn.Module, keep: Tensor, scale: Tensor | None) -> int:
    idx = keep.nonzero().squeeze(1)
    if scale is not None:
        mlp.down_proj.weight.mul_(scale.to(mlp.down_proj.weight)[None, :])
    down = mlp.down_proj
    mlp.gate_proj = _linear(*_rows(mlp.gate_proj, idx))
    mlp.up_proj = _linear(*_rows(mlp.up_proj, idx))
    mlp.down_proj = _linear(down.weight[:, idx].clone(), None if down.bias is None else down.bias.clone())
    return len(idx)


def _compact_experts(block: nn.Module, groups: list[Group], masks: Masks) -> dict[str, Any]:
    experts = block.experts
    kept = []  # per expert: (gate [w, H], up [w, H], down [H, w])
    for g in sorted(groups, key=lambda g: g.expert):
        gate, up, down = expert_weights(experts, g.expert)
        idx = masks.keep[g.name].nonzero().squeeze(1)
        down = down[:, idx].clone()
        if g.name in masks.scale:
            down.mul_(masks.scale[g.name][idx].to(down)[None, :])
        kept.append((gate[idx].clone(), up[idx].clone(), down))
    widths = [gate.shape[0] for gate, _, _ in kept]
    if hasattr(experts, "gate_up_proj") and len(set(widths)) == 1 and widths[0] % FUSED_ALIGN == 0:
        experts.gate_up_proj = nn.Parameter(torch.stack([torch.cat([g, u]) for g, u, _ in kept]), requires_grad=False)
        experts.down_proj = nn.Parameter(torch.stack([d for _, _, d in kept]), requires_grad=False)
        experts.intermediate_dim = widths[0]
        return {"experts": widths, "experts_fused": True}
    block.experts = _ragged(experts, kept)
    return {"experts": widths, "experts_fused": False}


def _ragged(experts: nn.Module, weights: list[tuple[Tensor, Tensor, Tensor]]) -> RaggedExperts:
    hidden = weights[0][2].shape[0]
    ragged = RaggedExperts(hidden, [g.shape[0] for g, _, _ in weights], experts.act_fn)
    for mlp, (gate, up, down) in zip(ragged, weights, strict=True):
        mlp.gate_proj.weight = nn.Parameter(gate.contiguous(), requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(up.contiguous(), requires_grad=False)
        mlp.down_proj.weight = nn.Parameter(down.contiguous(), requires_grad=False)
    return ragged


@torch.no_grad()
def compact(model: nn.Module, structure: Structure, masks: Masks) -> dict[str, Any]:
    """Fold scales and slice every pruned unit out of `model`, in place; returns the per-layer layout."""
    masks.check(structure)
    was_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = decoder_layers(model)
    layout: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        groups = structure.layer_groups(i)
        spec: dict[str, Any] = {}
        for g in groups:
            if g.kind == "attn":
                spec |= _compact_attention(layer.self_attn, g, masks.keep[g.name], masks.scale.get(g.name))
            elif g.kind == "mlp":
                spec["intermediate"] = _compact_mlp(layer.mlp, masks.keep[g.name], masks.scale.get(g.name))
                spec["down_bias"] = layer.mlp.down_proj.bias is not None
        expert_groups = [g for g in groups if g.kind == "expert"]
        if expert_groups:
            spec |= _compact_experts(layer.mlp, expert_groups, masks)
        layout.append(spec)
    _write_layout(model, structure.family, layout)
    for name, p in model.named_parameters():
        p.requires_grad_(name in was_trainable)
    return model.config.prunebench_layout


def _write_layout(model: nn.Module, family: str, layers: list[dict[str, Any]]) -> None:
    """Record the per-layer shapes; when every layer has one shape, also write the stock config sizes."""
    info = FAMILIES[family]
    cfg = model.config
    attn = {(s["q_heads"], s["kv_heads"]) for s in layers}
    dense = {s["intermediate"] for s in layers if "intermediate" in s}
    expert = {w for s in layers for w in s.get("experts", [])}
    ragged = any(not s["experts_fused"] for s in layers if "experts" in s)
    stock = len(attn) == 1 and len(dense) <= 1 and len(expert) <= 1 and not ragged
    stock = stock and all(s["kv_index"] is None for s in layers)
    cfg.head_dim = layers[0]["head_dim"]
    if stock:
        sizes = dict(zip(("num_attention_heads", "num_key_value_heads"), attn.pop(), strict=True))
        if dense:
            sizes[info.dense_width_key] = dense.pop()
        if expert:
            sizes[info.expert_width_key] = expert.pop()
        candidate = _declarable(cfg, sizes)
        # the stock modules must also hold the same parameters (not so with a bias a method added)
        stock = candidate is not None and _same_parameters(model, candidate)
        if stock:
            for key, value in sizes.items():
                setattr(cfg, key, value)
    cfg.prunebench_layout = {"version": 1, "stock": stock, "layers": layers}


def stock_widths(config: Any, structure: Structure) -> dict[str, list[int]]:
    """Per unit kind, the uniform kept widths a stock checkpoint of this family can declare: attention widths the
    family's config validator accepts (Llama wants hidden_size % heads == 0) and fused expert widths that are
    multiples of FUSED_ALIGN. A method that promises a standard checkpoint (MaskPrune) selects among these."""
    out: dict[str, list[int]] = {}
    for g in structure.groups:
        if g.kind in out:
            continue
        if g.kind == "attn":
            ratio = config.num_attention_heads // config.num_key_value_heads
            out["attn"] = [w for w in range(1, g.n_units + 1) if _declarable(config, {
                "num_attention_heads": w * g.heads_per_unit,
                "num_key_value_heads": max(1, w * g.heads_per_unit // ratio)}) is not None]
        elif g.kind == "expert":
            out["expert"] = [w for w in range(1, g.n_units + 1) if w % FUSED_ALIGN == 0 or w == g.n_units]
    return out


def _declarable(config: Any, sizes: dict[str, int]) -> Any:
    """The family's config with `sizes`, or None where its own validator refuses them (Llama wants
    hidden_size % heads == 0): the validator has the last word on what a stock checkpoint can declare."""
    try:
        return type(config).from_dict(config.to_dict() | sizes)
    except (ValueError, StrictDataclassError):
        return None


def _same_parameters(model: nn.Module, config: Any) -> bool:
    """Whether the stock model class built from `config` has exactly `model`'s parameter names and shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return shapes == {name: tuple(p.shape) for name, p in reference.named_parameters()}


def verified_compact(model: nn.Module, structure: Structure, masks: Masks, probe: Tensor) -> float:
    """Compact in place and return max |logits(compact) - logits(gated)| on `probe` token ids [B, T]."""
    with Gates(model, structure) as gates, torch.no_grad():
        gates.apply_masks(masks)
        gated = model(probe).logits.float()
    compact(model, structure, masks)
    with torch.no_grad():
        return float((model(probe).logits.float() - gated).abs().max())


def save_pruned(model: nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """Write a (possibly pruned) model so that `load_pruned` restores it exactly; stock layout when possible."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = getattr(model.config, LAYOUT_KEY, None)
    if layout is None or layout["stock"]:
        model.save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
        save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_pruned(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load any checkpoint written by `save_pruned` (or a plain HF directory), whatever its per-layer shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout is None or layout["stock"]:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto").eval()
    saved = json.loads((directory / "config.json").read_text()).get("dtype")
    model = AutoModelForCausalLM.from_config(config)
    model.to(dtype or getattr(torch, saved or "float32"))
    _reshape(model, layout["layers"])
    load_model(model, str(directory / WEIGHTS), strict=True)
    model.tie_weights()
    return model.eval()


def _empty(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def _reshape(model: nn.Module, layers: list[dict[str, Any]]) -> None:
    """Rebuild every decoder module at the shapes recorded in a layout (values come from the checkpoint)."""
    for layer, spec in zip(decoder_layers(model), layers, strict=True):
        attn, hd = layer.self_attn, spec["head_dim"]
        like = attn.q_proj.weight
        hidden = attn.q_proj.in_features

        def proj(lin: nn.Linear, out: int, like: Tensor = like, hidden: int = hidden) -> tuple:
            return _empty(out, hidden, like=like), None if lin.bias is None else _empty(out, like=like)

        q_out, kv_out = spec["q_heads"] * hd, spec["kv_heads"] * hd
        per_slot = spec["q_heads"] // (len(spec["kv_index"]) if spec["kv_index"] else spec["kv_heads"])
        o_bias = _empty(hidden, like=like) if spec.get("o_bias", attn.o_proj.bias is not None) else None
        _install_attention(
            attn,
            _linear(*proj(attn.q_proj, q_out)),
            _kv_linear(*proj(attn.k_proj, kv_out), hd, spec["kv_index"]),
            _kv_linear(*proj(attn.v_proj, kv_out), hd, spec["kv_index"]),
            _linear(_empty(hidden, q_out, like=like), o_bias),
            per_slot,
        )
        mlp = layer.mlp
        if "intermediate" in spec:
            w = spec["intermediate"]
            mlp.gate_proj = _linear(*proj(mlp.gate_proj, w))
            mlp.up_proj = _linear(*proj(mlp.up_proj, w))
            down_bias = _empty(hidden, like=like) if spec.get("down_bias", mlp.down_proj.bias is not None) else None
            mlp.down_proj = _linear(_empty(hidden, w, like=like), down_bias)
        if spec.get("experts_fused"):
            experts, (w, *_) = mlp.experts, spec["experts"]
            experts.gate_up_proj = nn.Parameter(_empty(len(spec["experts"]), 2 * w, hidden, like=like))
            experts.down_proj = nn.Parameter(_empty(len(spec["experts"]), hidden, w, like=like))
            experts.intermediate_dim = w
        elif "experts" in spec:
            shapes = [(_empty(w, hidden, like=like), _empty(w, hidden, like=like), _empty(hidden, w, like=like))
                      for w in spec["experts"]]
            mlp.experts = _ragged(mlp.experts, shapes)
