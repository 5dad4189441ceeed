"""The one mask-learning engine behind every gradient-trained mask method (DDP, hard-concrete L0, MaskPrune).

A method supplies a `Relaxation`: its gate parameters, the forward mask used in training, the per-unit keep
probability that feeds the sparsity regulariser, and its discrete final mask. Everything else is shared and
identical across methods, so a comparison isolates the relaxation (docs/methods.md, the mask-learning engine):
frozen weights by default, the same calibration batches, next-token loss (optional KD to the dense logits), the
Lagrangian lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 with lambdas by gradient ascent, optional target warm-up,
per-step curves, convergence and train-test mismatch diagnostics, early stop, gradient accumulation and a NaN guard.

The clocks are the run's, not the step's. Adam moves a parameter by at most about its learning rate per step, and a
multiplier grows by about its learning rate per step, while every schedule (mu, temperature, target warm-up) runs in
fractions of the run. So the default learning rates are `travel / steps`: the total distance a gate or a multiplier
may move is fixed, and a 120-step run follows a 300-step run's trajectory in fraction-of-run coordinates (a fixed
lr of 0.05 is only right near 300 steps; at 120 the anneal saturates before the multipliers can push a gate across
zero). An explicit `lr` or `lambda_lr` overrides the default.

Every run reports how much of its budget the relaxation reached on its own (`relaxed_sparsity`: the sparsity of the
keep-set the method commits to before the exact-budget projection) and how much the projection decided
(`projection_share`: the parameters the top-up or trim moved, as a share of the removed parameters). A row whose
relaxation missed its target is a projection result, and reports mark it as such.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from suite.data.calibration import Calibration
from suite.errors import ConfigError, NumericalError
from suite.methods.pruner import MethodConfig, Pruner, PruneResult, calibration_ids
from suite.model.families import decoder_layers
from suite.model.gates import Gates
from suite.model.loss import next_token_nll
from suite.model.masks import Masks, Target, select
from suite.model.modules import eval_mode, model_device
from suite.model.structures import Group, Structure
from suite.progress import Heartbeat

log = logging.getLogger(__name__)


class MaskLearningConfig(MethodConfig):
    """Settings shared by every mask-learning method (the engine's budget and Lagrangian)."""

    steps: int = Field(300, ge=1, description="optimisation steps")
    batch_size: int = Field(8, ge=1, description="calibration sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step")
    travel: float = Field(15.0, gt=0, description="total Adam travel of a gate or multiplier over the run: the "
                          "default lr and lambda_lr are travel / steps (0.05 at 300 steps)")
    lr: float | None = Field(None, gt=0, description="learning rate of the gate parameters (Adam); "
                             "default travel / steps")
    lambda_lr: float | None = Field(None, gt=0, description="learning rate of the Lagrange multipliers (ascent); "
                                    "default travel / steps")
    overshoot: Literal["none", "reset", "damp"] = Field(
        "none", description="project addition: when the sparsity gap changes sign, zero the multipliers (reset) or "
        "halve them (damp), and clear their Adam moments either way; none = plain ascent, as published")
    polish: float = Field(0.0, ge=0, le=1, description="project addition: gates-only phase on the final keep-set "
                          "after a top-up or trim, as a fraction of steps (0 = off)")
    preset: str | None = Field(None, description="a named bundle of project additions (`prunebench methods NAME` "
                               "lists them); explicit params override its values")
    weighting: Literal["params", "count"] = Field("params", description="weight units by parameters or count")
    target_warmup: float = Field(0.0, ge=0, le=1, description="fraction of steps to ramp the target from 0")
    kd_weight: float = Field(0.0, ge=0, description="weight of KL(dense || gated) next to the LM loss")
    train_weights: bool = Field(False, description="also train the model weights (Sheared-LLaMA setting)")
    weights_lr: float = Field(1e-4, gt=0, description="learning rate of the model weights when trained")
    early_stop: int = Field(0, ge=0, description="stop once the discrete keep-set is unchanged this many steps "
                            "with hard sparsity within 0.5% of the target (0 = run all steps)")
    valid_batches: int = Field(2, ge=1, description="held-out calibration batches for the mismatch diagnostic")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass instead of keeping "
        "them: activation memory of one layer plus every layer's input, for about one more forward pass")
    autocast: Literal["off", "bfloat16", "float16"] = Field(
        "off", description="run the model's forward under torch.autocast in this dtype (gates, multipliers and the "
        "loss stay fp32)")

    budget: ClassVar[frozenset[str]] = frozenset({
        "steps", "batch_size", "grad_accum", "valid_batches", "gradient_checkpointing", "autocast"})
    # the engine's multiplier reset: the one addition that, in the DDP ablation, brought every learner to its budget
    # at 120 steps; a method adds its own additions to it
    presets: ClassVar[dict[str, dict[str, Any]]] = {"budget-safe": {"overshoot": "reset"}}

    def gate_lr(self) -> float:
        """The gates' learning rate: explicit, or the run's travel spread over its steps."""
        return self.lr if self.lr is not None else self.travel / self.steps

    def multiplier_lr(self) -> float:
        """The multipliers' learning rate: explicit, or the run's travel spread over its steps."""
        return self.lambda_lr if self.lambda_lr is not None else self.travel / self.steps


class Relaxation(ABC):
    """How a method parameterises, relaxes and discretises its gates."""

    def __init__(self, config: MethodConfig, structure: Structure, groups: list[Group], seed: int) -> None:
        self.config = config
        self.structure = structure
        self.groups = groups
        self.seed = seed

    @abstractmethod
    def parameters(self) -> dict[str, nn.Parameter]:
        """Trainable gate parameters per group name."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups (all at the engine's `lr` unless a relaxation sets its own)."""
        return [{"params": list(self.parameters().values())}]

    @abstractmethod
    def train_gates(self, step: int) -> dict[str, Tensor]:
        """The forward mask used at training step `step` (may be stochastic)."""

    @abstractmethod
    def keep_probability(self, step: int) -> dict[str, Tensor]:
        """Per unit in [0, 1]: what the regulariser counts as kept."""

    @abstractmethod
    def discrete_keep(self) -> dict[str, Tensor]:
        """The discrete keep-set the method would commit to now (for convergence and hard sparsity)."""

    @abstractmethod
    def final(self, target: Target) -> tuple[Masks, dict[str, Any]]:
        """Final masks meeting the target exactly (keep + scales to fold) and diagnostics."""

    def anneal(self, step: int) -> dict[str, float]:
        """Schedule values to record per step (mu, temperature...)."""
        return {}

    def after_step(self, gap: float) -> None:  # noqa: B027 - optional hook, most relaxations need none
        """Projection or clamping after each optimiser step (gap = s_hat - target)."""

    def observe(self, step: int, hard_gap: float) -> None:  # noqa: B027 - optional hook
        """What the discrete keep-set's sparsity missed the target by after `step` (for schedules that wait on the
        hard count rather than the soft one)."""

    def mismatch_gates(self) -> list[dict[str, Tensor]]:
        """The training-time mask(s) at the end of training; stochastic methods return several samples."""
        return [self.train_gates(self.config.steps)]


def sparsity_weights(structure: Structure, groups: list[Group], weighting: str) -> tuple[dict[str, Tensor], float]:
    """Per group, what each unit counts for in the expected sparsity, and the total it is a fraction of: skipped
    layers count as kept when units are weighted by parameters."""
    weights = {g.name: unit_weights(g, weighting) for g in groups}
    if weighting == "params":
        return weights, float(structure.prunable_params)
    return weights, float(sum(w.sum() for w in weights.values()))


def unit_weights(group: Group, weighting: str) -> Tensor:
    """What a unit counts for in the expected sparsity: its parameters (shared K/V split over its heads) or 1."""
    if weighting == "count":
        return torch.ones(group.n_units, dtype=torch.float64)
    per_unit = group.unit_params + (group.kv_params / group.heads_per_kv if group.kv_params else 0.0)
    return torch.full((group.n_units,), float(per_unit), dtype=torch.float64)


class Lagrangian(nn.Module):
    """lambda1 (s_hat - t) + lambda2 (s_hat - t)^2; the multipliers start at 0 and rise by gradient *ascent*
    (their optimiser uses maximize=True, the equivalent of Sheared-LLaMA's negative learning rate; docs/methods.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, gap: Tensor) -> Tensor:
        return self.lambda1 * gap + self.lambda2 * gap**2


def target_at(step: int, steps: int, target: float, warmup: float) -> float:
    """Sparsity target at a step: ramps linearly from 0 over the warm-up fraction (Sheared practice)."""
    if warmup <= 0:
        return target
    return target * min(1.0, step / max(1.0, warmup * steps))


def effective_sparsity(structure: Structure, keep: dict[str, Tensor]) -> float:
    """Parameter sparsity of a keep-set that may miss groups (unlisted groups count as fully kept)."""
    removed = sum(g.removed_params(keep[g.name]) for g in structure.groups if g.name in keep)
    return removed / structure.prunable_params


def projection_share(structure: Structure, relaxed: dict[str, Tensor], masks: Masks) -> float:
    """Share of the final removed parameters that the exact-budget projection decided: units it trimmed (kept by
    the relaxation, removed in the end) plus units it topped up (removed by the relaxation, kept in the end), over
    the parameters the final masks remove. 0 = the relaxation alone met the budget; 1 = the projection chose it all."""
    moved = 0.0
    for g in structure.groups:
        if g.name in relaxed:
            changed = relaxed[g.name] != masks.keep[g.name]
            moved += float(unit_weights(g, "params")[changed].sum())
    removed = masks.removed_params(structure)
    return moved / removed if removed else 0.0


def rank_masks(structure: Structure, ranking: dict[str, Tensor], target: Target, seed: int = 0) -> Masks:
    """Exact-budget masks keeping the highest-ranked units (DDP: top z; hard-concrete: top log-alpha), honouring
    every Target constraint through the shared selection; skipped layers have no ranking and stay whole."""
    full = {g.name: ranking.get(g.name, torch.full((g.n_units,), math.inf)) for g in structure.groups}
    return select(structure, full, target, mode="global", normalize="raw", seed=seed)


class MaskLearner(Pruner):
    """Pruner base for mask-learning methods: subclasses name their Relaxation."""

    Config = MaskLearningConfig
    needs_calibration = True
    quick: ClassVar[dict[str, Any]] = {"steps": 12, "batch_size": 4, "valid_batches": 1}
    # the engine's own knobs, which every mask learner's default Optuna space includes with the same ranges, so
    # `tuned: true` gives each learner the same kind of search (lr = lambda_lr = travel / steps)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "target_warmup": {"type": "float", "low": 0.0, "high": 0.5},
        "travel": {"type": "float", "low": 5.0, "high": 50.0, "log": True},
    }
    relaxation: type[Relaxation]

    def make_relaxation(self, model: nn.Module, structure: Structure, groups: list[Group], seed: int) -> Relaxation:
        """The method's relaxation for this model (a method needing the model's config overrides this)."""
        return self.relaxation(self.config, structure, groups, seed)

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        cfg = self.config
        calibration_ids(self.name, calibration)
        torch.manual_seed(seed)
        groups = [g for g in structure.groups if g.layer not in target.skip_layers]
        rank_masks(structure, {g.name: torch.zeros(g.n_units) for g in groups}, target)  # unreachable: fail now
        relax = self.make_relaxation(model, structure, groups, seed)
        weights, total_weight = sparsity_weights(structure, groups, cfg.weighting)
        device = model_device(model)
        train_ids, valid_ids = _split_calibration(calibration, cfg.batch_size * cfg.valid_batches)
        lagrangian = Lagrangian().to(device)
        opt = torch.optim.Adam(relax.param_groups(), lr=cfg.gate_lr())
        lag_opt = torch.optim.Adam(lagrangian.parameters(), lr=cfg.multiplier_lr(), maximize=True)
        with eval_mode(model):  # no dropout: the gates are what is learned
            model.requires_grad_(cfg.train_weights)
            weight_opt = torch.optim.AdamW(model.parameters(), lr=cfg.weights_lr) if cfg.train_weights else None
            curves: dict[str, list[float]] = {k: [] for k in ("loss", "lm_loss", "expected_sparsity", "hard_sparsity",
                                                               "target", "lambda1", "lambda2")}
            batches = _Batches(train_ids, cfg, seed, device)
            keep_history: list[bytes] = []  # the discrete keep-set after every step, for convergence
            stopped_at = cfg.steps
            resets, last_sign = 0, 0.0
            start = time.perf_counter()
            from tqdm import tqdm

            bar = tqdm(range(cfg.steps), desc=f"{self.name}", leave=False, disable=None)
            heartbeat = Heartbeat(self.name, shown=not bar.disable)
            checkpointing = checkpointed(model) if cfg.gradient_checkpointing else contextlib.nullcontext()
            with Gates(model, structure) as gates, checkpointing:
                for step in bar:
                    t_now = target_at(step, cfg.steps, target.sparsity, cfg.target_warmup)
                    for _ in range(cfg.grad_accum):
                        lm = batches.loss(model, gates, relax.train_gates(step))
                        keep = relax.keep_probability(step)
                        kept = sum((weights[n].to(keep[n]) * keep[n].double()).sum() for n in keep)
                        expected = 1.0 - kept / total_weight
                        gap = expected - t_now
                        loss = lm + lagrangian(gap.float())
                        if not torch.isfinite(loss):
                            raise NumericalError(f"{self.name}: loss became {loss.item()} at step {step} "
                                                 f"(lr {cfg.gate_lr():.3g}, lambda lr {cfg.multiplier_lr():.3g}); "
                                                 "lower the learning rates")
                        (loss / cfg.grad_accum).backward()
                    for o in (opt, lag_opt, weight_opt):
                        if o is not None:
                            o.step()
                            o.zero_grad(set_to_none=True)
                    sign = math.copysign(1.0, gap.item()) if gap.item() else 0.0
                    # the gap changed sign: the multipliers overshot
                    if cfg.overshoot != "none" and sign * last_sign < 0:
                        with torch.no_grad():
                            for value in lagrangian.parameters():
                                value.mul_(0.0 if cfg.overshoot == "reset" else 0.5)
                        lag_opt.state.clear()
                        resets += 1
                    last_sign = sign or last_sign
                    schedule = relax.anneal(step)  # the values this step used, before a schedule adapts to it
                    relax.after_step(gap.item())
                    hard = relax.discrete_keep()
                    hard_sparsity = effective_sparsity(structure, hard)
                    relax.observe(step, hard_sparsity - t_now)
                    record = {"loss": loss.item(), "lm_loss": lm.item(), "expected_sparsity": expected.item(),
                              "hard_sparsity": hard_sparsity, "target": t_now,
                              "lambda1": lagrangian.lambda1.item(), "lambda2": lagrangian.lambda2.item()}
                    for key, value in record.items():
                        curves[key].append(value)
                    for key, value in schedule.items():
                        curves.setdefault(key, []).append(value)
                    if self.step_callback is not None:
                        self.step_callback(step, curves)
                    keep_history.append(b"".join(hard[n].numpy().tobytes() for n in sorted(hard)))
                    bar.set_postfix(loss=f"{float(lm.detach()):.3f}", sp=f"{hard_sparsity:.3f}")
                    heartbeat.beat(lambda step=step, lm=lm, sp=hard_sparsity, t=t_now: f"step {step + 1}/{cfg.steps}, "
                                   f"hard sparsity {sp:.3f} (target {t:.3f}), loss {float(lm.detach()):.3f}")
                    stable = len(keep_history) - convergence_step(keep_history)
                    if cfg.early_stop and stable > cfg.early_stop and abs(hard_sparsity - target.sparsity) < 5e-3:
                        stopped_at = step + 1
                        break
                prune_seconds = time.perf_counter() - start
                relaxed = hard  # the keep-set the relaxation committed to after its last step
                masks, diagnostics = relax.final(target)
                share = projection_share(structure, relaxed, masks)
                diagnostics |= _mismatch(model, gates, relax, masks, valid_ids, device)
                polish_steps = round(cfg.polish * cfg.steps) if share > 0 else 0
                if polish_steps:
                    _polish(masks, set(relaxed), gates, batches, model, polish_steps, cfg.gate_lr())
                    gates.apply_masks(masks)
                    diagnostics["valid_loss_polished"] = lm_loss(model, valid_ids, device)
                    gates.set_all(dict.fromkeys(gates.values))
            model.requires_grad_(False)
        diagnostics |= {
            "relaxed_sparsity": hard_sparsity,
            "projection_share": share,
            "effective_sparsity": effective_sparsity(structure, _computing(masks)),
            "polish_steps": polish_steps,
            "multiplier_resets": resets,
            "convergence_step": convergence_step(keep_history),
            "steps_run": stopped_at,
            "tokens_seen": batches.tokens,
            "train_seconds": prune_seconds,
            "final_lambda1": curves["lambda1"][-1],
            "final_lambda2": curves["lambda2"][-1],
            "final_expected_sparsity": curves["expected_sparsity"][-1],
        }
        masks.describe(calibration=calibration.spec, calibration_hash=calibration.content_hash)
        return PruneResult(masks, curves=curves, timings={"train_seconds": prune_seconds}, diagnostics=diagnostics)


class _Batches:
    """Seeded calibration micro-batches and the gated model's training loss on them (next-token cross-entropy,
    plus KL to the dense logits when `kd_weight` > 0): the one loss of the training loop and the polish phase."""

    def __init__(self, ids: Tensor, cfg: MaskLearningConfig, seed: int, device: torch.device) -> None:
        self.ids, self.cfg, self.device = ids, cfg, device
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def loss(self, model: nn.Module, gates: Gates, values: dict[str, Tensor]) -> Tensor:
        idx = torch.randint(0, len(self.ids), (self.cfg.batch_size,), generator=self.gen)
        batch = self.ids[idx].to(self.device)
        self.tokens += batch.numel()
        dense_logits = None
        if self.cfg.kd_weight > 0:
            gates.set_all(dict.fromkeys(gates.values))
            with torch.no_grad(), autocast(self.cfg.autocast, self.device):
                dense_logits = model(batch).logits.float()
        gates.set_all(values)
        with autocast(self.cfg.autocast, self.device):
            logits = model(batch).logits.float()
        lm = next_token_nll(logits, batch)
        if dense_logits is not None:
            kd = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True,
                          reduction="batchmean") / logits.shape[1]
            lm = lm + self.cfg.kd_weight * kd
        return lm


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device`'s type ("off": no autocast)."""
    if dtype == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder layer for the block: each layer's forward runs under
    `torch.utils.checkpoint` (non-reentrant), so backward recomputes it from its input. Unlike transformers' own
    switch it works in eval mode (mask learning runs without dropout) and leaves nothing behind."""
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward again


def _computing(masks: Masks) -> dict[str, Tensor]:
    """Kept units that compute something: a unit kept at scale 0 (a top-up whose gate is dead) is pruned in effect."""
    return {n: k & (masks.scale[n] != 0) if n in masks.scale else k for n, k in masks.keep.items()}


def _polish(masks: Masks, names: set[str], gates: Gates, batches: _Batches, model: nn.Module, steps: int,
            lr: float) -> None:
    """A short gates-only phase on the final keep-set, with no regulariser: after a top-up or trim the kept scales
    re-adapt to the units that were added or removed, and topped-up units (whose gate was 0) get a live one, started
    at their group's mean kept scale. Only the learned groups (`names`) move. Writes the scales into `masks.scale`."""
    scales = {}
    for name in names:
        keep = masks.keep[name]
        scale = masks.scale[name].float().clone() if name in masks.scale else keep.float()
        live = keep & (scale > 0)
        fill = float(scale[live].mean()) if live.any() else 1.0
        scales[name] = nn.Parameter(torch.where(keep & (scale <= 0), torch.full_like(scale, fill), scale))
    opt = torch.optim.Adam(list(scales.values()), lr=lr)
    for _ in range(steps):
        loss = batches.loss(model, gates, {n: masks.keep[n].float() * torch.relu(s) for n, s in scales.items()})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    masks.scale |= {n: masks.keep[n].float() * torch.relu(s.detach()) for n, s in scales.items()}


def _split_calibration(calibration: Calibration, n_valid: int) -> tuple[Tensor, Tensor]:
    """Train and held-out calibration sequences: the calibration's own valid set, else its last sequences."""
    ids = calibration.input_ids
    valid = calibration.valid_ids
    if valid is not None:
        return ids, valid
    if len(ids) <= n_valid:
        raise ConfigError(f"calibration has {len(ids)} sequences; need more than the {n_valid} held out")
    return ids[:-n_valid], ids[-n_valid:]


@torch.no_grad()
def lm_loss(model: nn.Module, ids: Tensor, device: torch.device, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits.float()
        total += float(next_token_nll(logits, batch, reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def _mismatch(model: nn.Module, gates: Gates, relax: Relaxation, masks: Masks, valid: Tensor,
              device: torch.device) -> dict[str, float]:
    """Train-test mismatch (docs/methods.md, diagnostics): held-out loss with the last training-time mask minus the
    loss of the discrete final model (gated with the final masks, which compaction reproduces exactly)."""
    train_losses = []
    for values in relax.mismatch_gates():
        gates.set_all(values)
        train_losses.append(lm_loss(model, valid, device))
    gates.apply_masks(masks)
    final_loss = lm_loss(model, valid, device)
    gates.set_all(dict.fromkeys(gates.values))
    dense_loss = lm_loss(model, valid, device)
    train_loss = sum(train_losses) / len(train_losses)
    return {"valid_loss_train_mask": train_loss, "valid_loss_final": final_loss, "valid_loss_dense": dense_loss,
            "mismatch": train_loss - final_loss}


def convergence_step(history: list[bytes]) -> int:
    """First step after which the discrete keep-set never changes (steps counted from 1; len+1 if never)."""
    step = len(history)
    while step > 0 and history[step - 1] == history[-1]:
        step -= 1
    return step + 1 if history else 1
