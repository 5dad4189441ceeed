"""Recovery fine-tuning after pruning: LoRA (through peft, merged back), full fine-tuning, or distillation from the
dense model's logits. One spec per experiment, so every method recovers with the same data, steps and settings.

The compact model is trained in place and comes back a plain model of the same shapes: LoRA adapters are merged into
its weights before anything is saved or evaluated, so a recovered checkpoint loads exactly like the pruned one
(stock `from_pretrained` when its widths are uniform, `load_pruned` or `trust_remote_code` otherwise).

Shapes peft does not know are adapted here, not special-cased by callers:
- K/V projections that replay heads after query-head pruning (`RepeatedHeadsLinear`) get a LoRA layer whose update
  is replayed the same way;
- fused expert weights (3-D `gate_up_proj` / `down_proj`) are adapted through peft's parameter targets, in a second
  adapter without dropout (peft applies none to a weight tensor); ragged experts are plain Linears and take the
  module targets.

The data are windows of a text source's train split (the calibration source by default), never an evaluation
split: `check_data` refuses the test split and any split an evaluation perplexity reads.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from suite.data.calibration import windows
from suite.data.sources import load_source
from suite.errors import ConfigError, NumericalError
from suite.hashing import digest
from suite.model.loss import next_token_nll
from suite.model.modeling_prunebench import MODEL_TYPE_PREFIX
from suite.model.modules import RepeatedHeadsLinear, is_experts
from suite.recovery.spec import RecoverySpec

PROBE_WINDOWS = 16  # training windows the loss is measured on before and after (fixed, dropout off)


@dataclass
class RecoveryResult:
    """What a recovery did: per-step curves, the loss on fixed training windows before and after, its cost."""

    curves: dict[str, list[float]] = field(default_factory=dict)
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    seconds: float = 0.0
    tokens: int = 0
    trainable_params: int = 0
    data_hash: str = ""

    def metrics(self) -> dict[str, float]:
        return {"recovery_loss_before": self.loss_before, "recovery_loss_after": self.loss_after,
                "recovery_seconds": self.seconds, "recovery_tokens": float(self.tokens),
                "recovery_trainable_params": float(self.trainable_params)}


def recovery_windows(spec: RecoverySpec, tokenizer: Any, calibration_source: str) -> Tensor:
    """The spec's training windows [n, seq_len]."""
    return windows(load_source(spec.source(calibration_source)), spec.data.split, tokenizer, spec.data.n,
                   spec.seq_len, spec.data.seed)


def recover(model: nn.Module, data: Tensor, spec: RecoverySpec, *, seed: int = 0, teacher: nn.Module | None = None,
            progress: bool = True) -> RecoveryResult:
    """Fine-tune `model` in place on `data` [n, seq_len] and return the record; LoRA adapters are merged. `teacher`
    (the dense model) is required for distill and ignored otherwise. A non-finite loss stops it with one line
    (NumericalError)."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if spec.method != "distill":
        teacher = None  # only distill learns from the dense model
    elif teacher is None:
        raise ConfigError("recovery.method distill needs the dense model as teacher")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    probe = data[:PROBE_WINDOWS].to(device)
    micro = spec.micro_batch_size or spec.batch_size
    result = RecoveryResult(data_hash=digest(data.numpy().tobytes(), length=16))
    result.loss_before = _loss(model, probe, micro)
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    trained = attach_lora(model, spec) if spec.uses_lora else model
    if not spec.uses_lora:
        model.requires_grad_(True)
    params = [p for p in trained.parameters() if p.requires_grad]
    result.trainable_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(spec.warmup * spec.steps), spec.steps)
    order = _order(len(data), spec.steps * spec.batch_size, seed)
    curves: dict[str, list[float]] = {"loss": [], "lr": []} | ({"kl": [], "lm": []} if teacher is not None else {})
    start = time.perf_counter()
    trained.train()
    bar = tqdm(range(spec.steps), desc=f"recovery ({spec.method})", leave=False, disable=None if progress else True)
    finished = False
    try:
        for step in bar:
            batch = data[order[step * spec.batch_size:(step + 1) * spec.batch_size]].to(device)
            totals: dict[str, float] = {}
            for chunk in batch.split(micro):
                parts = _objective(trained, chunk, spec, teacher)
                loss = parts["loss"]
                if not torch.isfinite(loss):
                    raise NumericalError(f"recovery diverged: loss {loss.item()} at step {step} (lr {spec.lr:g}); "
                                         "lower recovery.lr")
                (loss * len(chunk) / len(batch)).backward()
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + v.item() * len(chunk) / len(batch)
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            curves["lr"].append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in totals.items():
                curves.setdefault(k, []).append(v)
            bar.set_postfix_str(f"loss {totals['loss']:.4f}")
        finished = True
    finally:
        bar.close()
        trained.eval()
        if spec.uses_lora:  # merged when training finished; dropped when it failed, leaving the pruned weights
            unwrapped = trained.merge_and_unload() if finished else trained.unload()
            if unwrapped is not model:
                raise RuntimeError("peft returned a different model object after unwrapping")
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable_before)
    result.seconds = time.perf_counter() - start
    result.tokens = spec.steps * spec.batch_size * spec.seq_len
    result.curves = curves
    result.loss_after = _loss(model, probe, micro)
    return result


def _order(n: int, draws: int, seed: int) -> Tensor:
    """Window indices for `draws` draws: seeded permutations of the n windows, one after another (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-draws // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[:draws]


def _objective(model: nn.Module, ids: Tensor, spec: RecoverySpec, teacher: nn.Module | None) -> dict[str, Tensor]:
    """The loss of one micro-batch (and its parts): next-token NLL, or KL(teacher || student) at the spec's
    temperature (scaled by T^2, so its gradients keep their size across temperatures) plus lm_weight x NLL."""
    logits = model(input_ids=ids).logits
    lm = next_token_nll(logits, ids)
    if teacher is None:
        return {"loss": lm}
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    t = spec.temperature
    student, dense = (F.log_softmax(x.float().flatten(0, 1) / t, -1) for x in (logits, target))
    kl = F.kl_div(student, dense, log_target=True, reduction="batchmean") * t * t
    return {"loss": kl + spec.lm_weight * lm, "kl": kl, "lm": lm}


@torch.no_grad()
def _loss(model: nn.Module, ids: Tensor, micro: int) -> float:
    """Mean next-token NLL on `ids`, dropout off."""
    was_training = model.training
    model.eval()
    total = sum(next_token_nll(model(input_ids=chunk).logits, chunk).item() * len(chunk) for chunk in ids.split(micro))
    model.train(was_training)
    return total / len(ids)


def attach_lora(model: nn.Module, spec: RecoverySpec) -> nn.Module:
    """`model` wrapped by peft with the spec's adapters: the module targets (with the spec's dropout) and, when the
    model has fused experts and gate/up/down are targeted, a second adapter on the expert weight tensors."""
    modules = _linear_targets(model, spec.target_modules)
    experts = _fused_expert_parameters(model, spec.target_modules)
    if not modules and not experts:
        raise ConfigError(f"recovery.target_modules: none of {list(spec.target_modules)} is a Linear of this model")
    common = {"r": spec.rank, "lora_alpha": spec.alpha, "bias": "none"}
    adapters = []
    if modules:
        config = peft.LoraConfig(target_modules=modules, lora_dropout=spec.dropout, **common)
        config._register_custom_module({RepeatedHeadsLinear: RepeatedHeadsLora})
        adapters.append(("default", config))
    if experts:
        adapters.append(("experts", peft.LoraConfig(target_modules=[], target_parameters=experts, lora_dropout=0.0,
                                                    **common)))
    with _new_adapters(model):
        wrapped = peft.get_peft_model(model, adapters[0][1], adapter_name=adapters[0][0])
        for name, config in adapters[1:]:
            wrapped.add_adapter(name, config)
    wrapped.base_model.set_adapter([name for name, _ in adapters])
    return wrapped


@contextlib.contextmanager
def _new_adapters(model: nn.Module) -> Iterator[None]:
    """peft rewrites the targets of MoE model types whose layout changed in transformers v5, so that adapters trained
    on v4 still load: under it `experts.0.gate_proj` (a ragged expert's Linear here) would become the fused
    `gate_up_proj` tensor. These adapters are new and name real modules, so the model type is hidden while they are
    injected."""
    config = model.config
    model_type = config.model_type
    config.model_type = f"{MODEL_TYPE_PREFIX}{model_type.removeprefix(MODEL_TYPE_PREFIX)}"
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question while it wraps
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            yield
    finally:
        config.model_type = model_type


def _linear_targets(model: nn.Module, projections: tuple[str, ...]) -> list[str]:
    """Full names of the Linear modules named like one of `projections`: given by name, peft would also match a
    fused expert tensor that happens to be called `down_proj`."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in projections]


def _fused_expert_parameters(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """peft parameter targets for fused experts (`experts.gate_up_proj`, `experts.down_proj`) that `targets` name."""
    fused = any(is_experts(m) and isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)
                for m in model.modules())
    if not fused:
        return []
    wanted = []
    if {"gate_proj", "up_proj"} & set(targets):
        wanted.append("experts.gate_up_proj")
    if "down_proj" in targets:
        wanted.append("experts.down_proj")
    return wanted


class RepeatedHeadsLora(LoraLinear):
    """LoRA on a K/V projection that replays heads: the low-rank update is added to the stored heads, then replayed
    with them, so training and merging (which adds the update to the stored weight) agree."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        y = F.linear(x, base.weight, base.bias)
        if not (self.disable_adapters or self.merged):
            for name in self.active_adapters:
                if name in self.lora_A:
                    a, b = self.lora_A[name], self.lora_B[name]
                    update = b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]
                    y = y + update.to(y.dtype)
        return base.replay(y)
