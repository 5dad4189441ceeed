"""One grid point on a loaded model, one way through: prune, stamp the masks, verify compact == gated, compact,
measure, evaluate (pruned, dense, retained %, speed), recover and evaluate again (when the run has a recovery
stage), and write the outputs.

The CLI's `prune`, the runner (its grid points, their nested rows and re-evaluations) and every bench share this
path, so a number means the same thing wherever it is made.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from suite.data.calibration import Calibration
from suite.evaluation.evaluate import EvalSpec, evaluate, speed
from suite.methods.pruner import Pruner, PruneResult
from suite.model.compact import save_pruned, verified_compact
from suite.model.load import compute_device, place
from suite.model.masks import Masks, Target
from suite.model.structures import Granularity, Structure, build_structure, param_count
from suite.outputs import output_dir
from suite.recovery.spec import RecoverySpec
from suite.recovery.train import RecoveryResult, recover
from suite.run.record import flat_metrics, retained, staged

log = logging.getLogger(__name__)
PROBE_SHAPE = (2, 16)
VERIFY_TOLERANCE = 1e-3  # fp32; compact and gated logits agree to ~1e-6 when compaction is right


@dataclass
class PruneOutcome:
    result: PruneResult
    metrics: dict[str, Any]


BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
CHUNK = 512  # the integer copy of a weight is made this many columns of its 2-D view at a time, never at full size


def _bit_sums(weight: Tensor, dim: int) -> Tensor:
    """Exact integer sums of `weight`'s bit patterns along `dim` of its 2-D view, plain and weighted by position,
    modulo 2^64: [2, size of the other dim]. Integer addition does not depend on order, so the same bits give the
    same sums on any device and thread count, and any changed bit changes them."""
    rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.detach().reshape(1, 1)
    rows = rows if dim == 1 else rows.T
    out = torch.zeros(2, rows.shape[0], dtype=torch.int64, device=rows.device)
    for start in range(0, rows.shape[1], CHUNK):
        part = rows[:, start:start + CHUNK].contiguous()
        bits = part.view(BITS.get(part.dtype, torch.int32)).to(torch.int64) if part.is_floating_point() \
            else part.to(torch.int64)
        position = torch.arange(start + 1, start + 1 + bits.shape[1], dtype=torch.int64, device=bits.device)
        out[0] += bits.sum(1)
        out[1] += bits @ position if bits.device.type == "cpu" else (bits * position).sum(1)
    return out


@torch.no_grad()
def weights_digest(model: nn.Module, structure: Structure) -> dict[str, Tensor]:
    """Exact digests of the model's weights, made to tell whether a method changed a weight the compact model keeps:
    per column for every group's consumer weight (o_proj, down_proj, an expert's down projection), so the columns
    of removed units, which layer-wise methods zero as they go, can be left out of the comparison; per parameter
    for everything else."""
    from suite.methods.capture import consumer_weight

    out: dict[str, Tensor] = {}
    covered = set()
    for group in structure.groups:
        view = consumer_weight(model, group)
        out[f"consumer:{group.name}"] = _bit_sums(view, 0)
        covered.add(view.untyped_storage().data_ptr())
    for name, param in model.named_parameters():
        if param.untyped_storage().data_ptr() not in covered:
            out[name] = _bit_sums(param, 1)
    return out


def kept_weights_changed(before: dict[str, Tensor], after: dict[str, Tensor], structure: Structure,
                         masks: Masks) -> bool:
    """Did the method change any weight the compact model keeps? Consumer columns of removed units are not compared
    (compaction drops them, whatever the method wrote there); every other digest must be identical."""
    from suite.methods.capture import unit_columns

    if before.keys() != after.keys():
        return True
    for group in structure.groups:
        key = f"consumer:{group.name}"
        kept = unit_columns(group)[masks.keep[group.name].cpu()].flatten()
        if not torch.equal(before[key][:, kept], after[key][:, kept]):
            return True
    return any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("consumer:"))


def prune_model(
    model: nn.Module,
    pruner: Pruner,
    target: Target,
    *,
    seed: int = 0,
    granularity: Granularity = "kv_group",
    calibration: Calibration | None = None,
    device: str | None = None,
) -> PruneOutcome:
    """Prune `model` in place with `pruner` and compact it; metrics carry the keys README documents for
    metrics.json. With `device` (a `--device` value), an offloading method leaves the model where it is and moves
    one decoder layer at a time to the compute device; any other method gets the whole model there (`place`); the
    compact model ends on `device` either way, ready to evaluate."""
    if device is not None:
        if pruner.offloads:
            pruner.device = compute_device(device)
        else:
            place(model, device)
    torch.manual_seed(seed)
    structure = build_structure(model, granularity, target.units)
    before = weights_digest(model, structure)
    start = time.perf_counter()
    result = pruner.prune(model, structure, calibration, target, seed=seed)
    prune_seconds = time.perf_counter() - start
    # a method that rewrote weights (a refit, compensation biases) cannot be replayed from its masks alone
    weights_changed = kept_weights_changed(before, weights_digest(model, structure), structure, result.masks)
    stamp(result.masks, pruner.name, seed, target.model_dump(mode="json"))
    metrics = {
        "method": pruner.name,
        "hyperparameters": pruner.config.model_dump(mode="json"),
        "target": target.model_dump(mode="json"),
        "seed": seed,
        "granularity": granularity,
        "prune_seconds": prune_seconds,
        "calibration": None if calibration is None else calibration.spec,
        "calibration_hash": None if calibration is None else calibration.content_hash,
        "weights_changed": weights_changed,
    } | compact_and_measure(model, structure, result.masks, seed)
    metrics |= {f"diag_{k}": v for k, v in result.diagnostics.items()}
    if device is not None and pruner.offloads:
        place(model, device)
    return PruneOutcome(result, metrics)


def stamp(masks: Masks, method: str, seed: int, target: dict[str, Any], **extra: Any) -> None:
    """What made these masks (method, seed, target, and the parent of a nested subset), in their own header."""
    masks.describe(method=method, seed=seed, target=target, **extra)


def apply_masks(model: nn.Module, masks: Masks, granularity: Granularity, seed: int = 0) -> dict[str, Any]:
    """Compact a freshly loaded dense `model` to known masks (a nested subset, or a re-evaluated pruning) and
    measure it, with the same compact == gated check as a fresh prune (over the unit kinds the masks' target
    pruned)."""
    units = masks.meta.get("target", {}).get("units")
    return compact_and_measure(model, build_structure(model, granularity, units), masks, seed)


def compact_and_measure(model: nn.Module, structure: Structure, masks: Masks, seed: int = 0) -> dict[str, Any]:
    """Compact `model` to `masks` after checking compact == gated on a probe batch; the size metrics."""
    masks.check(structure)
    # per-group parameter counts travel with the masks, so reports can weight what was removed without a model
    masks.describe(group_params={g.name: g.params for g in structure.groups},
                   group_removed={g.name: g.removed_params(masks.keep[g.name]) for g in structure.groups})
    added = param_count(model) - structure.total_params  # e.g. FLAP's compensation biases
    probe = torch.randint(model.config.vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    diff = verified_compact(model, structure, masks, probe.to(device))
    if diff > VERIFY_TOLERANCE and next(model.parameters()).dtype == torch.float32:
        log.warning("compact model differs from the gated model by %.3g", diff)
    removed = masks.removed_params(structure)
    params_compact = param_count(model)
    if params_compact != structure.total_params - removed + added:
        raise RuntimeError(f"compaction removed {structure.total_params + added - params_compact} params, "
                           f"masks say {removed}")
    return {
        "sparsity": masks.sparsity(structure),
        "total_sparsity": masks.total_sparsity(structure),
        "params_dense": structure.total_params,
        "params_prunable": structure.prunable_params,
        "params_compact": params_compact,
        "params_added": added,
        "compact_vs_gated_max_abs_diff": diff,
        "structure_fingerprint": structure.fingerprint,
        "family": structure.family,
        "units": ",".join(structure.units),
    }


def evaluate_pruned(model: nn.Module, tokenizer: Any, protocol: EvalSpec, dense: dict[str, float],
                    dense_model: nn.Module | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The compact model's numbers under `protocol`: its flat metrics, the dense ones they compare with
    (`dense.*`), retained % (`retained.*`) and, given the dense model, speed ratios (`speed.*`); and the full
    evaluation result (with its protocol)."""
    evaluation = evaluate(model, tokenizer, protocol)
    pruned = flat_metrics(evaluation)
    metrics = pruned | {f"dense.{k}": v for k, v in dense.items()} | retained(pruned, dense)
    if dense_model is not None:
        metrics |= {f"speed.{k}": v for k, v in speed(model, dense_model).items()}
    return metrics, evaluation


@dataclass
class Evaluated:
    """A compact model's numbers, and with a recovery stage the recovered model's: `metrics` as a run records them
    (plain names without recovery; `pruned.*`, `recovered.*` and `recovery_*` with it), the full evaluation results
    (each with its protocol) and what the recovery did."""

    metrics: dict[str, float]
    evaluation: dict[str, Any]
    recovered: dict[str, Any] | None = None
    recovery: RecoveryResult | None = None

    def results(self) -> dict[str, Any]:
        """The evaluation results to store: the pruned model's, and the recovered one's (`recovered`) if any."""
        return self.evaluation | ({"recovered": self.recovered} if self.recovered is not None else {})


def evaluate_stages(model: nn.Module, tokenizer: Any, protocol: EvalSpec, dense: dict[str, float], *,
                    dense_model: nn.Module | None = None, recovery: RecoverySpec | None = None,
                    data: Tensor | None = None, seed: int = 0, progress: bool = True) -> Evaluated:
    """Evaluate the compact model (w/o tune); with a `recovery` stage, fine-tune it in place on `data` (the teacher
    of distill: `dense_model`) and evaluate it again (w/ tune) under the same protocol. Speed is measured once, on
    the pruned model: recovery changes no shape."""
    metrics, evaluation = evaluate_pruned(model, tokenizer, protocol, dense, dense_model)
    if recovery is None:
        return Evaluated(metrics, evaluation)
    if data is None:
        raise ValueError("a recovery stage needs its training windows")
    done = recover(model, data, recovery, seed=seed, teacher=dense_model, progress=progress)
    after, recovered = evaluate_pruned(model, tokenizer, protocol, dense)
    return Evaluated(staged(metrics, "pruned") | staged(after, "recovered") | done.metrics(), evaluation, recovered,
                     done)


def write_outputs(out: Path, model: nn.Module, tokenizer: Any, outcome: PruneOutcome) -> None:
    """DIR/model/ (compact model + tokenizer), DIR/masks.safetensors + masks.json, DIR/metrics.json, curves; all or
    nothing (a killed prune leaves the previous DIR or none, never a model without its masks). DIR must be new, empty
    or an earlier prune output (suite.outputs)."""
    with output_dir(out, "prune") as tmp:
        save_pruned(model, tmp / "model", tokenizer)
        outcome.result.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(outcome.metrics, indent=1, sort_keys=True))
