"""Physically remove pruned units, and save/reload pruned checkpoints.

Compaction owns every attribute fix a smaller module needs (head counts, widths, K/V sharing), so no method ever
patches a Hugging Face module. Per-unit scales are folded into the consumer weights first (o_proj columns,
down_proj columns), which makes the compact model compute what the gated model computed.

A model whose layers all kept one shape is written in the stock format with the reduced sizes in config.json, so
`AutoModelForCausalLM.from_pretrained` loads it. Any other shape is written with its per-layer widths declared in
config.json, its layout (`prunebench_layout`) and the modeling code that builds it (`modeling_prunebench.py`,
registered in `auto_map`): every HF tool loads it with `trust_remote_code=True`, and no stock class accepts it.
`load_pruned` builds the same classes and then loads the weights strictly: a weight is never silently
re-initialised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from suite.errors import ConfigError, ModelLoadError
from suite.model import modeling_prunebench
from suite.model.families import FAMILIES, Family, MlpProjections, family_of
from suite.model.gates import Gates
from suite.model.masks import Masks
from suite.model.modeling_prunebench import (
    LAYOUT_KEY,
    MODEL_TYPE_PREFIX,
    PRUNED_CLASSES,
    install_attention,
    kv_linear,
    linear,
    ragged_experts,
)
from suite.model.modules import expert_weights
from suite.model.structures import Group, Structure, full_structure

# HF's grouped_mm expert kernels need 16-byte aligned strides: a fused width must be a multiple of 8 (bf16);
# other uniform widths use RaggedExperts, so a stock-loadable MoE checkpoint always runs (round_to: 8 keeps it).
FUSED_ALIGN = 8
WEIGHTS = "model.safetensors"
REMOTE_CODE = "modeling_prunebench.py"


def strict(loading_info: dict[str, Any], where: Any) -> None:
    """One error line when `from_pretrained` left a tensor out, found an extra one, or had to resize one:
    transformers would otherwise initialise the missing ones at random and carry on."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in loading_info.get(kind) or ())
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise ModelLoadError(f"{where}: {kind.replace('_keys', '')} tensors in the checkpoint: "
                                 f"{', '.join(found[:3])}{more}; refusing to load it with those weights "
                                 "initialised at random")


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
    install_attention(
        attn,
        linear(*_rows(attn.q_proj, q_rows)),
        kv_linear(*_rows(attn.k_proj, kv_rows), hd, kv_index),
        kv_linear(*_rows(attn.v_proj, kv_rows), hd, kv_index),
        linear(o_weight, o_bias),
        per_slot,
    )
    return {"q_heads": len(q_rows) // hd, "kv_heads": len(kv_rows) // hd, "kv_index": kv_index, "head_dim": hd,
            "o_bias": o_bias is not None}


def _compact_mlp(family: Family, layer: nn.Module, keep: Tensor, scale: Tensor | None) -> int:
    idx = keep.nonzero().squeeze(1)
    gate, up, down = family.mlp_projections(layer)
    if scale is not None:
        down.weight.mul_(scale.to(down.weight)[None, :])
    family.set_mlp_projections(layer, MlpProjections(
        linear(*_rows(gate, idx)), linear(*_rows(up, idx)),
        linear(down.weight[:, idx].clone(), None if down.bias is None else down.bias.clone())))
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
    block.experts = ragged_experts(experts.act_fn, kept)
    return {"experts": widths, "experts_fused": False}


@torch.no_grad()
def compact(model: nn.Module, structure: Structure, masks: Masks) -> dict[str, Any]:
    """Fold scales and slice every pruned unit out of `model`, in place; returns the per-layer layout."""
    masks.check(structure)
    # the unit kinds a target left alone keep every unit, and still describe their layer's shape
    full = full_structure(model, structure.granularity)
    masks = Masks({g.name: masks.keep.get(g.name, torch.ones(g.n_units, dtype=torch.bool)) for g in full.groups},
                  masks.scale, full.fingerprint)
    was_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    family = family_of(model)
    layout: list[dict[str, Any]] = []
    for i, layer in enumerate(family.layers(model)):
        groups = full.layer_groups(i)
        spec: dict[str, Any] = {}
        for g in groups:
            if g.kind == "attn":
                spec |= _compact_attention(family.attention(layer), g, masks.keep[g.name], masks.scale.get(g.name))
            elif g.kind == "mlp":
                spec["intermediate"] = _compact_mlp(family, layer, masks.keep[g.name], masks.scale.get(g.name))
                spec["down_bias"] = family.consumer(layer, "mlp").bias is not None
        expert_groups = [g for g in groups if g.kind == "expert"]
        if expert_groups:
            spec |= _compact_experts(family.moe(layer), expert_groups, masks)
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
            sizes[info.width_key("mlp")] = dense.pop()
        if expert:
            sizes[info.width_key("expert")] = expert.pop()
        candidate = info.declarable(cfg, sizes)
        # the stock modules must also hold the same parameters (not so with a bias a method added)
        stock = candidate is not None and _same_parameters(model, candidate)
        if stock:
            for key, value in sizes.items():
                setattr(cfg, key, value)
    layout: dict[str, Any] = {"version": 1, "stock": stock, "layers": layers}
    if not stock:  # the dense sizes the stock modules start from, before each layer is rebuilt at its shape
        keys = ("num_attention_heads", "num_key_value_heads", info.width_key("mlp"), info.width_key("expert"))
        layout["dense"] = {k: getattr(cfg, k) for k in keys if k is not None and hasattr(cfg, k)}
    cfg.prunebench_layout = layout


def stock_widths(config: Any, structure: Structure) -> dict[str, list[int]]:
    """Per unit kind, the uniform kept widths a stock checkpoint of this family can declare: attention widths the
    family's config validator accepts (Llama wants hidden_size % heads == 0) and fused expert widths that are
    multiples of FUSED_ALIGN. A method that promises a standard checkpoint (MaskPrune) selects among these."""
    out: dict[str, list[int]] = {}
    family = structure.family_info()
    for g in structure.groups:
        if g.kind in out:
            continue
        if g.kind == "attn":
            ratio = config.num_attention_heads // config.num_key_value_heads
            out["attn"] = [w for w in range(1, g.n_units + 1) if family.declarable(config, {
                "num_attention_heads": w * g.heads_per_unit,
                "num_key_value_heads": max(1, w * g.heads_per_unit // ratio)}) is not None]
        elif g.kind == "expert":
            out["expert"] = [w for w in range(1, g.n_units + 1) if w % FUSED_ALIGN == 0 or w == g.n_units]
    return out


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


def pruned_config(config: Any) -> Any:
    """The config of a non-uniform checkpoint: the family's `Prunebench...Config`, which declares per-layer widths
    and names the shipped modeling code in `auto_map` (a stock config passes through unchanged)."""
    layout = getattr(config, LAYOUT_KEY, None)
    if layout is None or layout["stock"] or config.model_type.startswith(MODEL_TYPE_PREFIX):
        return config
    config_class, _ = PRUNED_CLASSES[config.model_type]
    return config_class.from_dict(config.to_dict() | {"model_type": config_class.model_type})


def save_pruned(model: nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """Write a (possibly pruned) model so that `load_pruned` restores it exactly. A uniform one is a stock
    checkpoint; any other ships `modeling_prunebench.py` and loads with `trust_remote_code=True` in any HF tool."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = getattr(model.config, LAYOUT_KEY, None)
    if layout is None or layout["stock"]:
        model.save_pretrained(directory)
    else:
        pruned_config(model.config).save_pretrained(directory)
        shutil.copyfile(modeling_prunebench.__file__, directory / REMOTE_CODE)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
        save_file(_unique_state(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_pruned(directory: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load any checkpoint written by `save_pruned` (or a plain HF directory), whatever its per-layer shapes. Pruned
    weights load strictly: a missing or extra tensor is an error, never a silent re-initialisation. prunebench's own
    layouts load through its own classes, never through the code they ship; a foreign checkpoint's code runs only
    with `trust_remote_code`."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory (no config.json)")
    raw = json.loads((directory / "config.json").read_text())
    layout = raw.get(LAYOUT_KEY)
    if layout is None or layout["stock"]:
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto",
                                                           trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
        strict(info, directory)
        return model.eval()
    family = raw.get("model_type", "").removeprefix(MODEL_TYPE_PREFIX)  # older checkpoints kept the stock type
    if family not in PRUNED_CLASSES:
        raise ModelLoadError(f"{directory}: unsupported model family {family!r}")
    config_class, model_class = PRUNED_CLASSES[family]
    config = config_class.from_dict(raw | {"model_type": config_class.model_type})
    model = model_class(config).to(dtype or getattr(torch, raw.get("dtype") or "float32"))
    try:
        state = load_file(str(directory / WEIGHTS))
    except SafetensorError as err:
        raise ModelLoadError(f"cannot load model from {directory}: a damaged safetensors file: {err}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = set(model.state_dict()) - set(_unique_state(model))  # tied names, present under their partner's
    if unexpected or set(missing) - shared:
        raise ModelLoadError(f"{directory}: weights do not match the pruned layout (missing "
                             f"{sorted(set(missing) - shared)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    return model.eval()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each stored once: a tensor shared by two names (tied input and output embeddings) under
    the input embedding's stock name (`model.embed_tokens.weight`), the key stock Llama files, GGUF converters and
    serving engines look for, never only as `lm_head.weight`."""
    embeddings = model.get_input_embeddings()
    first = {f"{name}.weight" for name, module in model.named_modules() if module is embeddings}
    tensors = model.state_dict()
    state, seen = {}, set()
    for name, tensor in sorted(tensors.items(), key=lambda item: (item[0] not in first, item[0])):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.contiguous()
    return state
