"""Optuna studies per (method, model): over the method's own default space (DDP: its anneal schedule), or any
space declared in YAML.

The objective is the calibration-valid loss of the pruned model (held-out windows of the valid split, never the
test split). Intermediate training losses feed a MedianPruner; the RDB storage (sqlite in the workdir by default)
is resumed with load_if_exists, so `prunebench tune` run again adds trials to the same study. Every tuned method
gets the same number of trials per invocation; every trial is a nested MLflow run; the best parameters are saved
where `prunebench run` finds them for methods marked `tuned: true`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from suite import atomic
from suite.hashing import digest
from suite.progress import Counter
from suite.run.config import Experiment, SearchDim
from suite.run.grid import tuned_path
from suite.run.preflight import preflight
from suite.run.record import KIND, error_line, missed, run_params
from suite.run.tracking import Tracker

log = logging.getLogger(__name__)


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
        with quiet_optuna():
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                                                 heartbeat_stale_trial_callback=on_stale)
        return optuna.create_study(storage=storage, **kwargs)

    for tries in range(4):
        try:
            return attempt()
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError, optuna.exceptions.DuplicatedStudyError):
            time.sleep(0.5 + tries)
    return attempt()  # a fifth failure is a real one: raised


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Heartbeats, stale-trial failing and their retry are "experimental" in Optuna 5, and heartbeats outside
    `Study.optimize` (our Ray tasks ask and tell) draw a warning too: said on every call, never news."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


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
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def _trial_identity(study_name: str, number: int) -> str:
    return f"trial:{study_name}:{number}"


@dataclass
class _Study:
    """What every trial of one (tuned method, model) study shares; rebuilt from the experiment in a Ray task."""

    exp: Experiment
    label: str
    model: str
    sampler_seed: int
    calibration: Any = None

    @property
    def name(self) -> str:
        return f"{self.exp.name}/{self.label}/{self.model}"

    @property
    def sparsity(self) -> float:
        return self.exp.tuning.sparsity or self.exp.sparsities[0]

    def build(self) -> _Study:
        """The calibration set (the same for every trial: the same content hash in every process)."""
        from suite.model.load import load_tokenizer

        self.calibration = self.exp.calibration.build(load_tokenizer(self.model), self.exp.tuning.seed)
        return self


def _open(exp: Experiment, workdir: Path, tracker: Tracker, study: _Study, sampler: Any = None) -> Any:
    """The study on its RDB storage, with the MedianPruner every trial reports to (and `sampler`, on the driver)."""
    import optuna

    return _open_study(storage_uri(workdir, exp.tuning.storage), exp.tuning.heartbeat_s,
                       partial(_stale, tracker, study.name), study_name=study.name, direction="minimize",
                       load_if_exists=True, sampler=sampler,
                       pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=exp.tuning.report_every))


REPEAT_POLL_S = 2.0  # how often a repeated sample looks again at its earlier twin still running elsewhere


def _evaluated_twin(trial: Any) -> Any | None:
    """The study's earlier trial with exactly these parameters that finished (COMPLETE or PRUNED), if any. A twin
    still RUNNING (another worker) is waited for, up to PRUNEBENCH_WAIT_S, so two workers never prune one
    configuration twice; a twin that failed, or never finishes, does not count and the trial runs."""
    import optuna

    from suite.run.claims import wait_seconds

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    deadline = time.monotonic() + wait_seconds()
    while True:
        twins = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number
                 and t.params == trial.params and "repeat_of" not in t.user_attrs]
        done = [t for t in twins if t.state in finished]
        if done:
            return done[0]
        if not any(t.state == optuna.trial.TrialState.RUNNING for t in twins) or time.monotonic() > deadline:
            return None
        time.sleep(REPEAT_POLL_S)


def _trial(trial: Any, study: _Study, tracker: Tracker) -> float:
    """One trial: prune with the suggested parameters (intermediate losses to the MedianPruner), score the
    calibration-valid loss; a nested MLflow run records it, with the host and process that ran it."""
    import optuna

    from suite.methods.mask_learning import lm_loss
    from suite.methods.pruner import get_method
    from suite.model.load import load_model
    from suite.model.masks import Target
    from suite.model.modules import model_device
    from suite.run.pipeline import prune_model

    exp = study.exp
    entry = {m.key: m for m in exp.methods}[study.label]
    method = get_method(entry.name)
    target = Target(**exp.target.model_dump(), sparsity=study.sparsity)
    params = entry.params | suggest(trial, exp.search_spaces()[study.label])
    trial.set_user_attr("sampler_seed", study.sampler_seed)  # which invocation's sampler proposed it
    twin = _evaluated_twin(trial)
    if twin is not None:  # Optuna's pattern for a repeated sample: the stored answer, not a second pruning
        trial.set_user_attr("repeat_of", twin.number)
        if twin.state == optuna.trial.TrialState.PRUNED:
            raise optuna.TrialPruned()
        trial.set_user_attr("relaxed_sparsity", twin.user_attrs.get("relaxed_sparsity"))
        return float(twin.value)
    run_id = tracker.start(f"tune/{study.label}/{study.model.removeprefix('zoo:')}/trial{trial.number}",
                           _trial_identity(study.name, trial.number), {KIND: "trial"})
    config = method.Config(**params)
    tracker.log(run_id, params=run_params(
        model=study.model, method=entry.name, label=study.label, sparsity=study.sparsity, seed=exp.tuning.seed,
        granularity=exp.granularity, dtype=exp.dtype, hyperparameters=config.model_dump(mode="json"),
        target=target.model_dump(mode="json"), calibration=exp.calibration.model_dump(mode="json"),
    ) | {"trial": trial.number})
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # once its run exists: a kill is seen

    def report(step: int, curves: dict[str, list[float]]) -> None:
        if (step + 1) % exp.tuning.report_every == 0:
            trial.report(curves["lm_loss"][-1], step)
            if trial.should_prune():
                raise optuna.TrialPruned()

    try:
        model, _ = load_model(study.model, exp.dtype)
        pruner = method(config)
        pruner.step_callback = report
        outcome = prune_model(model, pruner, target, seed=exp.tuning.seed, granularity=exp.granularity,
                              calibration=study.calibration, device=exp.device)
        value = lm_loss(model, study.calibration.valid_ids, model_device(model))
        relaxed = outcome.metrics.get("diag_relaxed_sparsity")
        trial.set_user_attr("relaxed_sparsity", relaxed)  # a trial the projection decided shows it
    except optuna.TrialPruned:
        tracker.finish(run_id, "KILLED")
        raise
    except Exception:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.log(run_id, params={"units": outcome.metrics["units"]},  # as a grid run records them
                metrics={"valid_loss": value} | ({"diag_relaxed_sparsity": relaxed} if relaxed is not None else {}))
    tracker.finish(run_id)
    return value


def tune(exp: Experiment, workdir: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run `tuning.n_trials` more trials for every (tuned method, model), in this process or as Ray tasks
    (`tuning.executor`); returns a summary per study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    preflight(exp, workdir, tuning=True, confirmed=True)  # every refusal before the stores are opened
    tracker = Tracker(workdir, exp.tracking.experiment or exp.name, exp.tracking.uri)
    summaries = []
    for label in exp.search_spaces():
        for model_spec in exp.models:
            study = _Study(exp, label, model_spec, invocation_seed(exp.tuning.seed)).build()
            optuna_study = _open(exp, workdir, tracker, study,
                                 optuna.samplers.TPESampler(seed=study.sampler_seed, constant_liar=True))
            before = len(optuna_study.trials)
            if exp.tuning.executor == "ray":
                _optimize_on_ray(optuna_study, study, workdir)
            else:
                optuna_study.optimize(partial(_trial, study=study, tracker=tracker), n_trials=exp.tuning.n_trials,
                                      catch=(ValueError, RuntimeError), show_progress_bar=progress,
                                      callbacks=[_trial_line(study, exp.tuning.n_trials)] if progress else [])
            summaries.append(_summary(workdir, study, optuna_study, before))
    parent = tracker.parent()  # the trials' parent: left RUNNING only while a sweep is still going
    if tracker.client.get_run(parent).info.status == "RUNNING":
        tracker.finish(parent)
    return summaries


def _trial_line(study: _Study, total: int) -> Callable[[Any, Any], None]:
    """An Optuna callback: `[k/K] tune LABEL on MODEL: trial N STATE, value V (best B)` where no bar shows."""
    counter = Counter(total)
    shown = sys.stderr.isatty()

    def line(optuna_study: Any, trial: Any) -> None:
        if shown:
            return
        try:
            best = f"{optuna_study.best_value:.4f}"
        except ValueError:  # no finished trial yet
            best = "none yet"
        value = f", value {trial.value:.4f}" if trial.value is not None else ""
        counter.finished(f"tune {study.label} on {study.model}: trial {trial.number} {trial.state.name.lower()}"
                         f"{value} (best {best})")

    return line


def _summary(workdir: Path, study: _Study, optuna_study: Any, before: int) -> dict[str, Any]:
    """The study's summary, saved where `prunebench run` finds the best parameters of a `tuned: true` method."""
    exp = study.exp
    best = optuna_study.best_trial
    out = tuned_path(workdir, exp.name, study.label, study.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    trials = optuna_study.trials
    states = [t.state.name for t in trials]
    summary = {"study": study.name, "label": study.label, "model": study.model, "best_params": best.params,
               "best_value": best.value, "n_trials": len(trials), "sparsity": study.sparsity,
               "requested": exp.tuning.n_trials, "ran": len(trials) - before,
               "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
               "failed": states.count("FAIL"), "relaxed_sparsity": best.user_attrs.get("relaxed_sparsity"),
               "retried": sum("failed_trial" in t.system_attrs for t in trials[before:]),
               # the budget that counts: configurations actually pruned (a repeated sample was answered from its twin)
               "distinct": sum("repeat_of" not in t.user_attrs and t.state.name in ("COMPLETE", "PRUNED")
                               for t in trials),
               "repeats": sum("repeat_of" in t.user_attrs for t in trials),
               "executor": exp.tuning.executor}
    summary["missed_budget"] = missed(summary["relaxed_sparsity"], study.sparsity)
    atomic.write_text(out, json.dumps(summary, indent=1, sort_keys=True))
    logging.getLogger(__name__).info("%s: best %.4f with %s", study.name, best.value, best.params)
    return summary


def trial_task(config: dict[str, Any], workdir: str, label: str, model: str, sampler_seed: int,
               number: int) -> float | None:
    """A Ray task: trial `number` of the study (asked by the driver) run against the shared RDB storage, its
    heartbeat recorded while it runs, and its result told to the storage from here. A worker that dies mid-trial
    leaves the trial RUNNING with a silent heartbeat: the driver's `fail_stale_trials` fails it and retries it."""
    import optuna

    from suite.model.load import quiet_transformers

    quiet_transformers()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = Experiment.model_validate(config)
    tracker = Tracker(Path(workdir), exp.tracking.experiment or exp.name, exp.tracking.uri)
    study = _Study(exp, label, model, sampler_seed).build()
    optuna_study = _open(exp, Path(workdir), tracker, study)
    storage = optuna_study._storage  # the RDBStorage behind the study: heartbeats go there
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.name), number)
    trial = optuna.trial.Trial(optuna_study, trial_id)
    with _heartbeat(storage, trial_id, exp.tuning.heartbeat_s), quiet_optuna():
        try:
            value = _trial(trial, study, tracker)
        except optuna.TrialPruned:
            optuna_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return None
        except Exception:
            optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    optuna_study.tell(trial, value)
    return value


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int, interval: int) -> Iterator[None]:
    """Record the trial's heartbeat every `interval` seconds while the block runs (a thread, as Optuna's own)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _optimize_on_ray(optuna_study: Any, study: _Study, workdir: Path) -> None:
    """`tuning.n_trials` new trials as Ray tasks: the driver asks (TPE with the constant liar, so trials in flight
    are not proposed twice), dispatches as many as the cluster has CPUs for, and each task tells. Between results the
    driver fails stale trials (a worker that died: its heartbeat went silent for `3 x heartbeat_s`), which queues
    their parameters once more (`_stale`); queued trials are asked first, and do not count as new ones. The driver
    also beats for every task Ray still holds (a task may wait for a worker, or import for seconds, before its own
    heartbeat starts); a task Ray reports dead gets no more beats. Ray itself never retries a trial task: a retry is
    always a new, recorded trial."""
    import optuna
    import ray

    from suite.run.executors import ray_session

    exp = study.exp
    config = exp.model_dump(mode="json")
    storage = optuna_study._storage
    with ray_session(exp.executor), quiet_optuna():
        task = ray.remote(trial_task).options(num_cpus=exp.executor.num_cpus, num_gpus=exp.executor.num_gpus,
                                              max_retries=0)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // exp.executor.num_cpus))
        study_id = storage.get_study_id_from_name(study.name)
        asked, in_flight, dispatched = 0, {}, []
        while True:
            optuna.storages.fail_stale_trials(optuna_study)
            waiting = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            while len(in_flight) < slots and (waiting or asked < exp.tuning.n_trials):
                trial = optuna_study.ask()
                if "failed_trial" not in storage.get_trial(trial._trial_id).system_attrs:  # a retry is not new
                    asked += 1
                suggest(trial, exp.search_spaces()[study.label])  # fixed now: the task reads them back
                in_flight[task.remote(config, str(workdir.resolve()), study.label, study.model, study.sampler_seed,
                                      trial.number)] = trial.number
                dispatched.append(trial.number)
                waiting = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            for number in in_flight.values():  # alive as far as Ray knows, maybe still starting: beat for it
                storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, number))
            running = [t for t in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if t.number in dispatched]
            if not in_flight and not running and not waiting and asked >= exp.tuning.n_trials:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=exp.tuning.heartbeat_s)
            for future in ready:
                number = in_flight.pop(future)
                try:
                    ray.get(future)
                except ray.exceptions.RayError as err:  # the trial is failed (told, or stale by its heartbeat)
                    log.warning("%s trial %d: %s", study.name, number, error_line(err))
