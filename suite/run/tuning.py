"""Optuna studies per (method, model): over the method's own default space (DDP: its anneal schedule), or any
space declared in YAML.

The objective is the calibration-valid loss of the pruned model (held-out windows of the valid split, never the
test split). Intermediate training losses feed a MedianPruner; the RDB storage (sqlite in the workdir by default)
is resumed with load_if_exists, so `prunebench tune` run again adds trials to the same study. Every tuned method
gets the same number of trials per invocation; every trial is a nested MLflow run; the best parameters are saved
where `prunebench run` finds them for methods marked `tuned: true`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from suite import atomic
from suite.hashing import digest
from suite.run.config import Experiment, SearchDim
from suite.run.grid import tuned_path
from suite.run.preflight import preflight
from suite.run.record import KIND, missed, run_params
from suite.run.tracking import Tracker


def storage_uri(workdir: Path, storage: str | None = None) -> str:
    """The study's RDB: `tuning.storage` (a server several tuning workers share), else sqlite in the workdir."""
    return storage or f"sqlite:///{(workdir / 'optuna.db').resolve()}"


def _open_study(url: str, heartbeat_s: int, on_stale: Any, **kwargs: Any) -> Any:
    """`optuna.create_study` on an RDB storage with trial heartbeats, retried: workers starting together on a fresh
    shared RDB race to create its tables (or the study) and all but one get an integrity error; a moment later the
    tables and study exist. A trial whose worker died stops beating; the next trial any worker starts fails it as
    stale (Optuna's `fail_stale_trials`, by the database's clock) and `on_stale` runs for it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    def attempt() -> Any:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: said once per study, not news
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                                                 failed_trial_callback=on_stale)
        return optuna.create_study(storage=storage, **kwargs)

    for tries in range(4):
        try:
            return attempt()
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError, optuna.exceptions.DuplicatedStudyError):
            time.sleep(0.5 + tries)
    return attempt()  # a fifth failure is a real one: raised


def suggest(trial: Any, space: dict[str, SearchDim]) -> dict[str, Any]:
    out = {}
    for name, dim in space.items():
        if dim.type == "categorical":
            out[name] = trial.suggest_categorical(name, dim.choices)
        elif dim.type == "int":
            out[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            out[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return out


def invocation_seed(seed: int) -> int:
    """The sampler seed of one `tune` invocation: `tuning.seed` mixed with this host, process and moment, so a second
    invocation, or a second worker on the same study, proposes different parameters instead of repeating the
    first's (Optuna's samplers only see finished trials). Recorded on every trial it proposes."""
    text = f"{seed}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    return int(digest(text, length=8), 16)


def _stale(tracker: Tracker, study_name: str, study: Any, trial: Any) -> None:
    """A trial whose worker died (failed as stale): its MLflow run is marked KILLED, and its parameters are queued
    once more, so the budget of completed trials is still met."""
    import optuna

    tracker.kill_orphans(_trial_identity(study_name, trial.number))
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)


def _trial_identity(study_name: str, number: int) -> str:
    return f"trial:{study_name}:{number}"


def tune(exp: Experiment, workdir: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run `tuning.n_trials` more trials for every (tuned method, model); returns a summary per study."""
    import optuna

    from suite.methods.mask_learning import lm_loss
    from suite.methods.pruner import get_method
    from suite.model.load import load_model
    from suite.model.masks import Target
    from suite.model.modules import model_device
    from suite.run.pipeline import prune_model

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spaces = exp.search_spaces()
    preflight(exp, workdir, tuning=True)  # every refusal before the stores are opened
    entries = {m.key: m for m in exp.methods}
    tracker = Tracker(workdir, exp.tracking.experiment or exp.name, exp.tracking.uri)
    sparsity = exp.tuning.sparsity or exp.sparsities[0]
    summaries = []
    for label, space in spaces.items():
        entry = entries[label]
        method = get_method(entry.name)
        for model_spec in exp.models:
            study_name = f"{exp.name}/{label}/{model_spec}"
            sampler_seed = invocation_seed(exp.tuning.seed)
            study = _open_study(
                storage_uri(workdir, exp.tuning.storage), exp.tuning.heartbeat_s, partial(_stale, tracker, study_name),
                study_name=study_name, direction="minimize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=exp.tuning.report_every),
            )
            _, tokenizer = load_model(model_spec, exp.dtype)
            target = Target(**exp.target.model_dump(), sparsity=sparsity)
            calibration = exp.calibration.build(tokenizer)

            def objective(trial: Any, entry=entry, space=space, model_spec=model_spec, study_name=study_name,
                          calibration=calibration, label=label, method=method, sampler_seed=sampler_seed,
                          target=target) -> float:
                params = entry.params | suggest(trial, space)
                trial.set_user_attr("sampler_seed", sampler_seed)  # which invocation's sampler proposed it
                run_id = tracker.start(f"tune/{label}/{model_spec.removeprefix('zoo:')}/trial{trial.number}",
                                       _trial_identity(study_name, trial.number), {KIND: "trial"})
                config = method.Config(**params)
                tracker.log(run_id, params=run_params(
                    model=model_spec, method=entry.name, label=label, sparsity=sparsity, seed=exp.tuning.seed,
                    granularity=exp.granularity, dtype=exp.dtype, hyperparameters=config.model_dump(mode="json"),
                    target=target.model_dump(mode="json"), calibration=exp.calibration.model_dump(mode="json"),
                ) | {"trial": trial.number})

                def report(step: int, curves: dict[str, list[float]]) -> None:
                    if (step + 1) % exp.tuning.report_every == 0:
                        trial.report(curves["lm_loss"][-1], step)
                        if trial.should_prune():
                            raise optuna.TrialPruned()

                try:
                    model, _ = load_model(model_spec, exp.dtype)
                    pruner = method(config)
                    pruner.step_callback = report
                    outcome = prune_model(model, pruner, target, seed=exp.tuning.seed, granularity=exp.granularity,
                                          calibration=calibration, device=exp.device)
                    value = lm_loss(model, calibration.valid_ids, model_device(model))
                    relaxed = outcome.metrics.get("diag_relaxed_sparsity")
                    trial.set_user_attr("relaxed_sparsity", relaxed)  # a trial the projection decided shows it
                except optuna.TrialPruned:
                    tracker.finish(run_id, "KILLED")
                    raise
                except Exception:
                    tracker.finish(run_id, "FAILED")
                    raise
                tracker.log(run_id, metrics={"valid_loss": value} | ({"diag_relaxed_sparsity": relaxed}
                                                                     if relaxed is not None else {}))
                tracker.finish(run_id)
                return value

            before = len(study.trials)
            study.optimize(objective, n_trials=exp.tuning.n_trials, catch=(ValueError, RuntimeError),
                           show_progress_bar=progress)
            best = study.best_trial
            out = tuned_path(workdir, exp.name, label, model_spec)
            out.parent.mkdir(parents=True, exist_ok=True)
            states = [t.state.name for t in study.trials]
            summary = {"study": study_name, "label": label, "model": model_spec, "best_params": best.params,
                       "best_value": best.value, "n_trials": len(study.trials), "sparsity": sparsity,
                       "requested": exp.tuning.n_trials, "ran": len(study.trials) - before,
                       "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                       "failed": states.count("FAIL"), "relaxed_sparsity": best.user_attrs.get("relaxed_sparsity")}
            summary["missed_budget"] = missed(summary["relaxed_sparsity"], sparsity)
            atomic.write_text(out, json.dumps(summary, indent=1, sort_keys=True))
            logging.getLogger(__name__).info("%s: best %.4f with %s", study_name, best.value, best.params)
            summaries.append(summary)
    parent = tracker.parent()  # the trials' parent: left RUNNING only while a sweep is still going
    if tracker.client.get_run(parent).info.status == "RUNNING":
        tracker.finish(parent)
    return summaries
