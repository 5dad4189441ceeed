"""Everything that can be known wrong before any store is touched, and the grid it would run."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

from suite.errors import ConfigError
from suite.evaluation.evaluate import check_positions, check_tasks
from suite.hub import hub_unreachable_reason, is_cached, require_hub
from suite.methods.pruner import get_method
from suite.model.families import FAMILIES
from suite.model.load import check_checkpoint, resolve
from suite.model.masks import Target
from suite.model.modeling_prunebench import MODEL_TYPE_PREFIX
from suite.outputs import check_workdir
from suite.run.claims import lease_seconds, wait_seconds
from suite.run.config import Experiment
from suite.run.grid import RunSpec, data_fingerprint, expand

log = logging.getLogger(__name__)


def preflight(exp: Experiment, workdir: Path, tuning: bool = False, confirmed: bool = False) -> list[RunSpec]:
    """`validate`, `run` and `tune` call this first, so validate says ok exactly when run will start: every model
    resolves (a local checkpoint of a supported family, a zoo model, or a hub id that is cached or reachable now),
    the calibration and evaluation texts load, the tasks exist, every method accepts its hyperparameters and target,
    tuned methods have their tuning results, and the tuning section (when given, or for `tune`) names real labels
    and hyperparameters. A sweep that cannot start fails here with one line and leaves the store as it was; so
    does a grid larger than `max_runs` unless `confirmed` (`run --yes`): a typo in a grid is weeks of compute."""
    check_workdir(workdir)
    for spec in exp.models:
        where = resolve(spec)
        if isinstance(where, Path):
            check_checkpoint(where)
            config = json.loads((where / "config.json").read_text())
            model_type = config.get("model_type", "").removeprefix(MODEL_TYPE_PREFIX)
            if model_type not in FAMILIES:
                raise ConfigError(f"{spec}: unsupported model family {model_type!r}; supported: "
                                  f"{', '.join(sorted(FAMILIES))}")
            lengths = {"calibration.seq_len": exp.calibration.seq_len} | {f"evaluation.ppl {p}": p.seq_len
                                                                         for p in exp.evaluation.ppl}
            try:
                check_positions(SimpleNamespace(**config), lengths)
                check_units(config, exp.target.units)
            except ConfigError as err:
                raise ConfigError(f"{spec}: {err}") from None
            for warning in coarse_kv_groups(config, exp):
                log.warning("%s: %s", spec, warning)
        elif not is_cached(where, "config.json") and hub_unreachable_reason() is not None:
            require_hub(f"model {where!r}")
    lease_seconds()  # a malformed PRUNEBENCH_LEASE_S or PRUNEBENCH_WAIT_S is refused before anything starts
    wait_seconds()
    data = data_fingerprint(exp)  # loads, so checks, the calibration and evaluation texts (each once)
    check_tasks(tuple(exp.evaluation.tasks))
    if exp.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor.kind 'ray' needs Ray: pip install 'prunebench[ray]'")
    if tuning or exp.tuning != type(exp.tuning)():  # a tuning section that says anything is checked
        exp.search_spaces()
    specs = expand(exp, workdir, require_tuned=not tuning, data=data)
    if len(specs) > exp.max_runs and not confirmed:
        raise ConfigError(f"the grid has {len(specs)} runs, more than max_runs {exp.max_runs}: run with --yes, or "
                          "set max_runs in the experiment, if that is meant")
    for spec in {(s.label, s.method, s.sparsity): s for s in specs}.values():
        method = get_method(spec.method)
        try:
            method(method.Config(**spec.hyperparameters)).check_target(Target(**spec.target))
        except ConfigError as err:
            raise ConfigError(f"methods.{spec.label}: {err}") from None
    return specs


COARSE = 0.10  # a per-layer attention cut further than this from the target: whole KV groups decide it


def coarse_kv_groups(config: dict, exp: Experiment) -> list[str]:
    """Warnings for sparsities that `kv_group` units cannot approach per layer: with few KV heads (SmolLM2-135M has 3
    per layer) a layer's attention loses 0 or a whole group, a third of its heads, so per-layer selection at 20%
    removes a third of the heads in most layers. Says what `query_head` units would do instead."""
    heads = config.get("num_attention_heads") or 0
    kv = config.get("num_key_value_heads") or heads
    units = exp.target.units
    if exp.granularity != "kv_group" or not kv or (units is not None and "attention" not in units):
        return []
    if units is None and (config.get("num_experts") or config.get("num_local_experts")):
        return []  # MoE models prune expert channels by default
    out = []
    for sparsity in exp.sparsities:
        removed = round(sparsity * kv) / kv
        if abs(removed - sparsity) > COARSE:
            fine = round(sparsity * heads) / heads
            out.append(f"at sparsity {sparsity:g}, kv_group units (this model has {kv} KV groups per layer) let a "
                       f"layer's attention lose {removed:.0%} of its heads, not {sparsity:.0%}, in every layer that "
                       f"per-layer selection cuts evenly; granularity query_head ({heads} units per layer) would "
                       f"remove {fine:.0%}, and selection global lets layers differ instead")
    return out


def check_units(config: dict, units: tuple[str, ...] | None) -> None:
    """Refuse a target's unit kind that the model (read from its config.json) does not have, as `build_structure`
    would once the model is loaded: expert channels need experts, MLP channels need a dense MLP layer."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    dense_layers = not experts or bool(config.get("mlp_only_layers")) or (config.get("decoder_sparse_step") or 1) > 1
    present = ("attention",) + (("mlp",) if dense_layers else ()) + (("expert",) if experts else ())
    missing = [k for k in units or () if k not in present]
    if missing:
        raise ConfigError(f"target.units: this {config.get('model_type')} model has no {' or '.join(missing)} "
                          f"units (it has {', '.join(present)})")
