"""The one mask-learning engine behind every gradient-trained mask method (DDP, hard-concrete L0, MaskPrune).

A method supplies a `Relaxation`: its gate parameters, the forward mask used in training, the per-unit keep
probability that feeds the sparsity regulariser, and its discrete final mask. Everything else is shared and
identical across methods, so a comparison isolates the relaxation (METHODS.md A3): frozen weights by default,
the same calibration batches, next-token loss (optional KD to the dense logits), the Lagrangian
lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 with lambdas by gradient ascent, optional target warm-up, per-step
curves, convergence and train-test mismatch diagnostics, early stop, gradient accumulation and a NaN guard.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from suite.errors import ConfigError, PruneBenchError
from suite.gates import Gates
from suite.masks import Masks, Target, select
from suite.pruner import MethodConfig, Pruner, PruneResult, calibration_ids
from suite.structures import Group, Structure

log = logging.getLogger(__name__)


class NumericalError(PruneBenchError):
    """Mask training diverged (NaN/Inf loss)."""


class MaskLearningConfig(MethodConfig):
    """Settings shared by every mask-learning method (the engine's budget and Lagrangian)."""

    steps: int = Field(300, ge=1, description="optimisation steps")
    batch_size: int = Field(8, ge=1, description="calibration sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step")
    lr: float = Field(0.05, gt=0, description="learning rate of the gate parameters (Adam)")
    lambda_lr: float = Field(0.05, gt=0, description="learning rate of the Lagrange multipliers (ascent)")
    weighting: Literal["params", "count"] = Field("params", description="weight units by parameters or count")
    target_warmup: float = Field(0.0, ge=0, le=1, description="fraction of steps to ramp the target from 0")
    kd_weight: float = Field(0.0, ge=0, description="weight of KL(dense || gated) next to the LM loss")
    train_weights: bool = Field(False, description="also train the model weights (Sheared-LLaMA setting)")
    weights_lr: float = Field(1e-4, gt=0, description="learning rate of the model weights when trained")
    early_stop: int = Field(0, ge=0, description="stop once the discrete keep-set is unchanged this many steps "
                            "with hard sparsity within 0.5% of the target (0 = run all steps)")
    valid_batches: int = Field(2, ge=1, description="held-out calibration batches for the mismatch diagnostic")


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
        """Projection, clamping or schedule adaptation after each optimiser step (gap = s_hat - target)."""

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
    (their optimiser uses maximize=True, the equivalent of Sheared-LLaMA's negative learning rate; METHODS.md B2)."""

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


def rank_masks(structure: Structure, ranking: dict[str, Tensor], target: Target) -> Masks:
    """Exact-budget masks keeping the highest-ranked units (DDP: top z; hard-concrete: top log-alpha), honouring
    every Target constraint through the shared selection; skipped layers have no ranking and stay whole."""
    full = {g.name: ranking.get(g.name, torch.full((g.n_units,), math.inf)) for g in structure.groups}
    return select(structure, full, target, mode="global", normalize="raw")


class MaskLearner(Pruner):
    """Pruner base for mask-learning methods: subclasses name their Relaxation."""

    Config = MaskLearningConfig
    needs_calibration = True
    relaxation: type[Relaxation]

    def make_relaxation(self, model: nn.Module, structure: Structure, groups: list[Group], seed: int) -> Relaxation:
        """The method's relaxation for this model (a method needing the model's config overrides this)."""
        return self.relaxation(self.config, structure, groups, seed)

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Any, target: Target, *, seed: int = 0
    ) -> PruneResult:
        cfg = self.config
        calibration_ids(self.name, calibration)
        torch.manual_seed(seed)
        groups = [g for g in structure.groups if g.layer not in target.skip_layers]
        rank_masks(structure, {g.name: torch.zeros(g.n_units) for g in groups}, target)  # unreachable: fail now
        relax = self.make_relaxation(model, structure, groups, seed)
        weights, total_weight = sparsity_weights(structure, groups, cfg.weighting)
        device = next(model.parameters()).device
        train_ids, valid_ids = _split_calibration(calibration, cfg.batch_size * cfg.valid_batches)
        lagrangian = Lagrangian().to(device)
        opt = torch.optim.Adam(relax.param_groups(), lr=cfg.lr)
        lag_opt = torch.optim.Adam(lagrangian.parameters(), lr=cfg.lambda_lr, maximize=True)
        was_training = model.training
        model.eval()  # no dropout: the gates are what is learned
        model.requires_grad_(cfg.train_weights)
        weight_opt = torch.optim.AdamW(model.parameters(), lr=cfg.weights_lr) if cfg.train_weights else None
        curves: dict[str, list[float]] = {k: [] for k in ("loss", "lm_loss", "expected_sparsity", "hard_sparsity",
                                                           "target", "lambda1", "lambda2")}
        gen = torch.Generator().manual_seed(seed)
        keep_history: list[bytes] = []  # the discrete keep-set after every step, for convergence
        stopped_at = cfg.steps
        start = time.perf_counter()
        tokens = 0
        from tqdm import tqdm

        bar = tqdm(range(cfg.steps), desc=f"{self.name}", leave=False, disable=None)
        with Gates(model, structure) as gates:
            for step in bar:
                t_now = target_at(step, cfg.steps, target.sparsity, cfg.target_warmup)
                for _ in range(cfg.grad_accum):
                    idx = torch.randint(0, len(train_ids), (cfg.batch_size,), generator=gen)
                    batch = train_ids[idx].to(device)
                    tokens += batch.numel()
                    dense_logits = None
                    if cfg.kd_weight > 0:
                        gates.set_all(dict.fromkeys(gates.values))
                        with torch.no_grad():
                            dense_logits = model(batch).logits.float()
                    gates.set_all(relax.train_gates(step))
                    logits = model(batch).logits.float()
                    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
                    if dense_logits is not None:
                        kd = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True,
                                      reduction="batchmean") / logits.shape[1]
                        lm = lm + cfg.kd_weight * kd
                    keep = relax.keep_probability(step)
                    kept = sum((weights[n].to(keep[n]) * keep[n].double()).sum() for n in keep)
                    expected = 1.0 - kept / total_weight
                    gap = expected - t_now
                    loss = lm + lagrangian(gap.float())
                    if not torch.isfinite(loss):
                        raise NumericalError(f"{self.name}: loss became {loss.item()} at step {step} "
                                             f"(lr {cfg.lr}, lambda lr {cfg.lambda_lr}); lower the learning rates")
                    (loss / cfg.grad_accum).backward()
                for o in (opt, lag_opt, weight_opt):
                    if o is not None:
                        o.step()
                        o.zero_grad(set_to_none=True)
                relax.after_step(gap.item())
                hard = relax.discrete_keep()
                hard_sparsity = effective_sparsity(structure, hard)
                record = {"loss": loss.item(), "lm_loss": lm.item(), "expected_sparsity": expected.item(),
                          "hard_sparsity": hard_sparsity, "target": t_now,
                          "lambda1": lagrangian.lambda1.item(), "lambda2": lagrangian.lambda2.item()}
                for key, value in record.items():
                    curves[key].append(value)
                for key, value in relax.anneal(step).items():
                    curves.setdefault(key, []).append(value)
                if self.step_callback is not None:
                    self.step_callback(step, curves)
                keep_history.append(b"".join(hard[n].numpy().tobytes() for n in sorted(hard)))
                bar.set_postfix(loss=f"{float(lm.detach()):.3f}", sp=f"{hard_sparsity:.3f}")
                stable = len(keep_history) - convergence_step(keep_history)
                if cfg.early_stop and stable > cfg.early_stop and abs(hard_sparsity - target.sparsity) < 5e-3:
                    stopped_at = step + 1
                    break
            prune_seconds = time.perf_counter() - start
            masks, diagnostics = relax.final(target)
            diagnostics |= _mismatch(model, gates, relax, masks, valid_ids, device)
        model.requires_grad_(False)
        model.train(was_training)
        diagnostics |= {
            "convergence_step": convergence_step(keep_history),
            "steps_run": stopped_at,
            "tokens_seen": tokens,
            "train_seconds": prune_seconds,
            "final_lambda1": curves["lambda1"][-1],
            "final_lambda2": curves["lambda2"][-1],
            "final_expected_sparsity": curves["expected_sparsity"][-1],
        }
        masks.meta |= {"calibration": getattr(calibration, "spec", ""), "calibration_hash":
                       getattr(calibration, "content_hash", "")}
        return PruneResult(masks, curves=curves, timings={"train_seconds": prune_seconds}, diagnostics=diagnostics)


def _split_calibration(calibration: Any, n_valid: int) -> tuple[Tensor, Tensor]:
    """Train and held-out calibration sequences: the calibration's own valid set, else its last sequences."""
    ids = calibration.input_ids
    valid = getattr(calibration, "valid_ids", None)
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
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def _mismatch(model: nn.Module, gates: Gates, relax: Relaxation, masks: Masks, valid: Tensor,
              device: torch.device) -> dict[str, float]:
    """Train-test mismatch (METHODS.md A2): held-out loss with the last training-time mask minus the loss of the
    discrete final model (gated with the final masks, which compaction reproduces exactly)."""
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
