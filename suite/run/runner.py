"""Run an experiment: expand the grid (suite.run.grid), skip what is FINISHED, hand the rest to an executor, and
record everything. The pipeline prunes, compacts and evaluates a point; the runner only schedules, claims and
records. Each dense model is evaluated once per protocol and reused for every retained-% number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from suite.data.calibration import Calibration
from suite.errors import PruneBenchError, disk_full, no_space
from suite.evaluation.evaluate import evaluate
from suite.methods.pruner import PruneResult, get_method
from suite.model.compact import load_pruned, save_pruned
from suite.model.load import load_model, load_tokenizer, parse_dtype, place
from suite.model.masks import Masks, Target
from suite.model.structures import param_count
from suite.progress import Counter
from suite.recovery.train import recovery_windows
from suite.run.claims import ClaimLost, Claims, open_claims, wait_seconds
from suite.run.config import Experiment
from suite.run.executors import LocalExecutor, Point, Row, executor_for
from suite.run.grid import RunSpec, code_fingerprint, dense_identity, model_fingerprint
from suite.run.pipeline import PruneOutcome, apply_masks, evaluate_stages, prune_model, stamp
from suite.run.preflight import preflight
from suite.run.record import (
    CODE,
    ERROR,
    KIND,
    METRICS_ARTIFACT,
    MODEL_ARTIFACT,
    NESTED_IN,
    PREFIX,
    PRUNED_BY,
    PRUNING,
    RECOVERY,
    RECOVERY_ARTIFACT,
    SWEEP,
    WORKER,
    error_line,
    flat_metrics,
    protocol_tags,
    run_params,
    table_row,
)
from suite.run.tracking import Tracker

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # how often a worker looks again at grid points another worker holds
# writes one more artifact of a pruned run into its artifact folder: (folder, spec, result); the CLI hands in
# the report's mask heatmap, so suite/ never imports reports/
ArtifactWriter = Callable[[Path, RunSpec, PruneResult], None]


class Runner:
    """Executes an experiment against one tracking store, in this process or one Ray task per grid point."""

    def __init__(self, exp: Experiment, workdir: Path, fail_fast: bool = False, progress: bool = True,
                 writers: Iterable[ArtifactWriter] = (), confirmed: bool = False) -> None:
        self.specs = preflight(exp, workdir, confirmed=confirmed)  # before the store is opened (or created)
        self.exp = exp
        self.workdir = workdir
        self.fail_fast = fail_fast
        self.progress = progress
        self.writers = tuple(writers)
        self.tracker = Tracker(workdir, exp.tracking.experiment or exp.name, exp.tracking.uri)
        self.protocol = exp.evaluation
        self.claims: Claims | None = None  # while a sweep (or a Ray task) runs
        self._calibration: dict[tuple[str, int], Calibration] = {}
        self._recovery_windows: dict[str, Any] = {}
        self._dense_reference: tuple[str | None, Any] = (None, None)

    def run(self) -> list[Row]:
        parent = self.tracker.parent()
        self.tracker.reopen(parent)
        rows: list[Row] = []
        try:
            with open_claims(self.workdir, self.tracker.uri) as claims:
                self.claims = claims
                self._sweep(rows)
        except BaseException as err:  # the parent says how the sweep ended: FAILED on an error, KILLED on Ctrl-C
            try:
                self.tracker.finish(parent, "FAILED" if isinstance(err, Exception) else "KILLED")
            except Exception:  # a store that refuses this write too (a full disk) must not hide why the sweep ended
                log.debug("could not close the parent run", exc_info=True)
            raise
        finally:
            self.claims = None
        self.tracker.finish(parent, "FINISHED" if all(r["status"] == "FINISHED" for r in rows) else "FAILED")
        return rows

    def _sweep(self, rows: list[Row]) -> None:
        """Every grid point once: found FINISHED, or run under a claim by the executor. Points another worker holds
        (or whose Ray task was lost) are then taken here, after waiting for their holders."""
        from tqdm import tqdm

        started = int(time.time() * 1000)
        bar = tqdm(total=len(self.specs), desc=f"{self.exp.name}", unit="run", disable=None if self.progress else True)
        counter = Counter(len(self.specs)) if bar.disable and self.progress else None  # lines where no bar shows
        executor = executor_for(self.exp.executor)
        for model in dict.fromkeys(s.model for s in self.specs):
            fingerprint = model_fingerprint(model)
            point = Point(fingerprint, self._dense_metrics(model, fingerprint), started)
            pending = [s for s in self.specs if s.model == model]
            waiting = Waiting(self._claims)
            held = self._collect(executor.map(self, pending, point), rows, bar, counter)
            while held:
                waiting.on({s.name: s.identity(fingerprint) for s in held})
                held = self._collect(LocalExecutor().map(self, held, point), rows, bar, counter)
        bar.close()
        grid = {(s.model, s.label, s.sparsity, s.seed): i for i, s in enumerate(self.specs)}
        rows.sort(key=lambda r: grid[(r["model"], r["method"], r["sparsity"], r["seed"])])

    @staticmethod
    def _collect(results: Iterator[tuple[RunSpec, Row | None]], rows: list[Row], bar: Any,
                 counter: Counter | None) -> list[RunSpec]:
        """Rows into `rows` as they come (and a progress line each, where no bar shows); the specs that came back
        without one."""
        held = []
        for spec, row in results:
            bar.set_postfix_str(spec.name)
            if row is None:
                held.append(spec)
                continue
            rows.append(row)
            bar.update(1)
            if counter is not None:
                counter.finished(point_line(spec, row), worked=not row.get("found", False))
        return held

    @property
    def _claims(self) -> Claims:
        if self.claims is None:
            raise RuntimeError("grid points run only inside Runner.run (or a Ray task), under its claims")
        return self.claims

    def point(self, spec: RunSpec, point: Point) -> Row | None:
        """One grid point's table row (None while another worker holds it)."""
        identity = spec.identity(point.fingerprint)
        run = self._claimed(identity, point.started, partial(self._execute, spec, identity, point))
        if run is None:
            return None
        found = point.started is not None and run.info.start_time < point.started  # done before this sweep
        return table_row(spec, run) | {"found": found}

    @staticmethod
    def in_task(config: dict[str, Any], workdir: str, spec: RunSpec, point: Point,
                writers: tuple[ArtifactWriter, ...]) -> Row | None:
        """A Ray task: one grid point, through a Runner of its own on the shared workdir and tracking store (the model
        fingerprint and dense metrics come from the driver, which already has them)."""
        from suite.model.load import quiet_transformers

        quiet_transformers()
        runner = Runner(Experiment.model_validate(config), Path(workdir), progress=False, writers=writers,
                        confirmed=True)  # the driver's preflight already passed the grid
        with open_claims(runner.workdir, runner.tracker.uri) as claims:
            runner.claims = claims
            return runner.point(spec, point)

    def _claimed(self, identity: str, started: int | None, execute: Callable[[Callable[[], None]], Any]) -> Any:
        """The grid point's run: FINISHED already, FAILED by another worker since `started` (not retried twice;
        None: a failure is always retried), or executed now under a claim; None while another live worker holds it."""
        done = self.tracker.find(identity)
        if done is not None:
            return done
        latest = self.tracker.latest(identity) if started is not None else None
        if latest is not None and latest.info.status == "FAILED" and latest.info.start_time >= started:
            return latest
        claims = self._claims
        if not claims.acquire(identity):
            return None
        try:
            done = self.tracker.find(identity)  # finished by another worker between the look and the claim
            if done is not None:
                return done
            self.tracker.kill_orphans(identity)
            return execute(partial(claims.fence, identity))
        except ClaimLost as lost:  # paused past the lease and taken over: the successor's result counts
            log.warning("%s", lost)
            return None
        finally:
            claims.release(identity)

    # -- the dense reference

    def _dense_metrics(self, model: str, fingerprint: str) -> dict[str, float]:
        """Dense metrics for this protocol: measured once (by one worker), then found by identity."""
        identity = dense_identity(self.exp, model, fingerprint, self.specs[0].evaluation_data)
        waiting = Waiting(self._claims)
        while True:
            run = self._claimed(identity, None, partial(self._measure_dense, model, identity))
            if run is not None:
                return dict(run.data.metrics)
            waiting.on({f"{model.removeprefix('zoo:')}/dense": identity})

    def _measure_dense(self, model: str, identity: str, fence: Callable[[], None]) -> Any:
        run_id = self.tracker.start(f"{model.removeprefix('zoo:')}/dense", identity,
                                    {KIND: "dense", PREFIX + "model": model, CODE: code_fingerprint()})
        try:
            m, tok = load_model(model, self.exp.dtype, device=self.exp.device)
            result = evaluate(m, tok, self.protocol)
            metrics = flat_metrics(result) | {"params_dense": param_count(m)}
            fence()
            self.tracker.log(run_id, params={"model": model, "method": "dense", "sparsity": 0.0},
                             metrics=metrics, tags=protocol_tags(result["protocol"]))
            self.tracker.log_json(run_id, result, "evaluation.json")
            fence()
            self.tracker.finish(run_id)
            return self.tracker.client.get_run(run_id)
        except ClaimLost:
            raise
        except Exception as err:
            self._close_failed(run_id, err)
            raise

    def _dense_model(self, model: str) -> Any:
        """The dense model, when a run needs it (speed ratios, or the teacher of a distill recovery); loaded once per
        model."""
        recovery = self.exp.recovery
        if not self.exp.evaluation.speed and (recovery is None or recovery.method != "distill"):
            return None
        if self._dense_reference[0] != model:
            self._dense_reference = (model, load_model(model, self.exp.dtype, device=self.exp.device)[0])
        return self._dense_reference[1]

    def _recovery_data(self, model: str, tokenizer: Any) -> Any:
        """The recovery stage's training windows, one set per model, identical for every method (None without a
        recovery stage)."""
        if self.exp.recovery is None:
            return None
        if model not in self._recovery_windows:
            self._recovery_windows[model] = recovery_windows(self.exp.recovery, tokenizer, self.exp.calibration.source)
        return self._recovery_windows[model]

    # -- one grid point

    def _calibration_for(self, model: str, tokenizer: Any, seed: int) -> Calibration:
        """One calibration sample per model and run seed, identical (same hash) for every method: each seed draws
        its own unless `calibration.fixed_draw`."""
        key = (model, self.exp.calibration.draw_seed(seed))
        if key not in self._calibration:
            self._calibration[key] = self.exp.calibration.build(tokenizer, seed)
        return self._calibration[key]

    def _execute(self, spec: RunSpec, identity: str, point: Point, fence: Callable[[], None]) -> Any:
        """Prune (or reuse an earlier pruning), evaluate and record one grid point; `fence` raises ClaimLost once
        this worker no longer holds the point, and is called before every write of its result."""
        pruning = spec.pruning_identity(point.fingerprint)
        tags = {KIND: "pruned", PREFIX + "model": spec.model, PREFIX + "method": spec.method,
                PREFIX + "label": spec.label, PREFIX + "model_fingerprint": point.fingerprint,
                WORKER: self._claims.worker, PRUNING: pruning, CODE: spec.code}
        source = self.tracker.find_tagged(PRUNING, pruning)
        run_id = self.tracker.start(spec.name, identity, tags)
        try:
            reused = None if source is None else self._reuse(spec, source)
            if reused is not None:
                model, tokenizer, outcome = reused
                self.tracker.log(run_id, tags={PRUNED_BY: source.info.run_id})
            else:
                model, tokenizer = load_model(spec.model, spec.dtype)  # prune_model places it
                method = get_method(spec.method)
                pruner = method(method.Config(**spec.hyperparameters))
                calibration = self._calibration_for(spec.model, tokenizer, spec.seed)  # data-free methods ignore it
                outcome = prune_model(model, pruner, Target(**spec.target), seed=spec.seed,
                                      granularity=spec.granularity, calibration=calibration, device=self.exp.device)
            self._record(run_id, spec, model, tokenizer, outcome, point, fence)
            for level, masks in sorted(outcome.result.nested.items()):  # logged before the parent finishes
                self._nested(spec, pruning, tags, level, masks, outcome.metrics, point, fence)
            fence()
            self.tracker.finish(run_id)
        except ClaimLost:
            raise
        except Exception as err:  # a sweep records the failure and goes on (--fail-fast re-raises)
            self._failed(run_id, err)
        return self.tracker.client.get_run(run_id)

    def _reuse(self, spec: RunSpec, source: Any) -> tuple[Any, Any, PruneOutcome] | None:
        """The compact model and pruning outcome of `source`, a FINISHED run of the same pruning identity, without
        pruning again: its stored checkpoint where the method rewrote weights, otherwise the dense model compacted
        to its masks (and checked compact == gated again). Its prune metrics, diagnostics and curves carry over.
        None when the masks cannot replay it (weights rewritten, or not known not to be, and no checkpoint stored):
        then the run prunes again."""
        with self.tracker.fetch_artifacts(source) as files:
            stored = json.loads((files / METRICS_ARTIFACT).read_text())
            stored.pop("evaluation", None)
            checkpoint = (files / MODEL_ARTIFACT).is_dir()
            if not checkpoint and stored.get("weights_changed") is not False:
                return None
            masks = Masks.load(files)
            nested = {float(d.name.removeprefix("sp")): Masks.load(d) for d in sorted((files / "nested").glob("sp*"))}
            curves = json.loads((files / "curves.json").read_text()) if (files / "curves.json").is_file() else {}
            if checkpoint:
                model = place(load_pruned(files / MODEL_ARTIFACT, parse_dtype(spec.dtype)), self.exp.device)
                tokenizer = load_tokenizer(spec.model)  # the dense weights are not needed
                metrics = stored
            else:
                model, tokenizer = load_model(spec.model, spec.dtype, device=self.exp.device)
                metrics = stored | apply_masks(model, masks, spec.granularity, spec.seed)
        return model, tokenizer, PruneOutcome(PruneResult(masks, curves=curves, nested=nested), metrics)

    def _nested(self, spec: RunSpec, pruning: str, tags: dict[str, str], level: float, masks: Masks,
                parent_metrics: dict[str, Any], point: Point, fence: Callable[[], None]) -> None:
        """A lower-sparsity subnetwork the method met on the way (GISP): its own row, on a fresh copy of the model
        (`pruning`: the parent's pruning identity, so a re-evaluation finds the same nested rows)."""
        nested = replace(spec, sparsity=level, target=spec.target | {"sparsity": level},
                         extra=spec.extra | {"nested_in": pruning})
        nested_id = nested.identity(point.fingerprint)
        if self.tracker.find(nested_id) is not None:
            return
        self.tracker.kill_orphans(nested_id)  # left RUNNING by a killed worker (the parent's claim covers it)
        run_id = self.tracker.start(nested.name, nested_id,
                                    tags | {NESTED_IN: pruning, PRUNING: nested.pruning_identity(point.fingerprint)})
        try:
            model, tokenizer = load_model(spec.model, spec.dtype, device=self.exp.device)
            stamp(masks, spec.method, spec.seed, nested.target, nested_in=pruning)
            metrics = parent_metrics | apply_masks(model, masks, spec.granularity, spec.seed)
            self._record(run_id, nested, model, tokenizer, PruneOutcome(PruneResult(masks), metrics), point, fence)
            fence()
            self.tracker.finish(run_id)
        except ClaimLost:
            raise
        except Exception as err:
            self._failed(run_id, err)

    def _failed(self, run_id: str, err: Exception) -> None:
        """Record a grid point's failure and go on; a write that ran out of space ends the sweep instead (every
        later point would fail the same way), with the run marked FAILED as far as the store still takes it."""
        log.debug("run %s failed", run_id, exc_info=True)
        if no_space(err) is not None:
            self._close_failed(run_id, err)  # raises: the sweep stops
        self.tracker.log(run_id, tags={ERROR: error_line(err)})
        self.tracker.finish(run_id, "FAILED")
        if self.fail_fast:
            raise err

    def _close_failed(self, run_id: str, err: Exception) -> None:
        """Mark a run FAILED with its cause, best effort: on a full disk the store may refuse this write too, and
        then the run stays RUNNING until the next sweep's orphan check, which fails it. A write that ran out of
        space then ends the sweep with its one line (DiskFull)."""
        with contextlib.suppress(Exception):
            self.tracker.log(run_id, tags={ERROR: error_line(err)})
        with contextlib.suppress(Exception):
            self.tracker.finish(run_id, "FAILED")
        if no_space(err) is not None:
            raise disk_full(err, self.workdir) from None

    def _record(self, run_id: str, spec: RunSpec, model: Any, tokenizer: Any, outcome: PruneOutcome, point: Point,
                fence: Callable[[], None]) -> None:
        """Evaluate the compact model, recover and evaluate it again when the experiment has a recovery stage (the
        pipeline), and log params, metrics, curves and artifacts. The pruning's artifacts (masks, the compact
        checkpoint of a method that rewrote weights) are written first: recovery changes the weights in place."""
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            self._pruning_artifacts(d, spec, model, outcome)
            result = evaluate_stages(model, tokenizer, self.protocol, point.dense,
                                     dense_model=self._dense_model(spec.model), recovery=self.exp.recovery,
                                     data=self._recovery_data(spec.model, tokenizer), seed=spec.seed,
                                     progress=self.progress)
            fence()
            numbers = outcome.metrics.items()
            metrics = {k: v for k, v in numbers if isinstance(v, int | float) and not isinstance(v, bool)}
            params = run_params(model=spec.model, method=spec.method, label=spec.label, sparsity=spec.sparsity,
                                seed=spec.seed, granularity=spec.granularity, dtype=spec.dtype,
                                hyperparameters=spec.hyperparameters, target=spec.target,
                                calibration=spec.calibration, recovery=spec.recovery)
            params["calibration.hash"] = outcome.metrics["calibration_hash"]
            params["units"] = outcome.metrics["units"]  # the target's unit kinds, resolved for this model
            tags = protocol_tags(result.evaluation["protocol"]) | {PREFIX + "device": self.exp.device}
            if spec.sweep:
                tags[SWEEP] = json.dumps(spec.sweep)
            if result.recovery is not None:
                params["recovery.data_hash"] = result.recovery.data_hash
                tags[RECOVERY] = json.dumps(spec.recovery, sort_keys=True)
                (d / RECOVERY_ARTIFACT).write_text(json.dumps(
                    {"spec": spec.recovery, "data_hash": result.recovery.data_hash, "curves": result.recovery.curves}
                    | result.recovery.metrics(), indent=1, sort_keys=True))
            self.tracker.log(run_id, params=params, metrics=metrics | result.metrics, tags=tags)
            self.tracker.log_curves(run_id, outcome.result.curves)
            if result.recovery is not None:
                self.tracker.log_curves(run_id, {f"recovery_{k}": v for k, v in result.recovery.curves.items()})
            (d / METRICS_ARTIFACT).write_text(json.dumps(outcome.metrics | {"evaluation": result.results()},
                                                         indent=1, sort_keys=True, default=str))
            self.tracker.log_artifacts(run_id, d)

    def _pruning_artifacts(self, d: Path, spec: RunSpec, model: Any, outcome: PruneOutcome) -> None:
        """Masks, curves, the writers' files and, for a method that rewrote weights, the compact checkpoint (what a
        later run with this pruning identity reuses)."""
        outcome.result.save(d)
        for write in self.writers:
            write(d, spec, outcome.result)
        if outcome.metrics.get("weights_changed") and self.exp.tracking.store_models:  # masks cannot replay it
            save_pruned(model, d / MODEL_ARTIFACT)


def point_line(spec: RunSpec, row: Row) -> str:
    """A finished grid point in one line: what ran, its headline numbers, and how long it took (or that it was
    already done)."""
    what = f"{spec.model} {spec.label} sp={spec.sparsity:g} seed={spec.seed}"
    if row["status"] != "FINISHED":
        return f"{what}: {row['status']} ({row.get('error') or 'see the table'})"
    numbers = f"ppl {row['ppl']:.2f}, acc {100 * row['mean_acc']:.1f}"
    return f"{what}: {numbers}, " + ("already done" if row.get("found") else f"prune {row['prune_s']:.1f} s")


class Waiting:
    """A worker waiting for grid points that other live workers hold: says once what it waits for and for whom,
    polls every POLL_SECONDS, and gives up with one line after PRUNEBENCH_WAIT_S (a holder whose heartbeat goes on
    while its work hangs would otherwise keep every other worker waiting forever)."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims
        self.since: float | None = None
        self.points: set[str] = set()
        self.deadline = wait_seconds()

    def on(self, points: dict[str, str]) -> None:
        """Wait one poll for `points` (name -> identity); the deadline counts from the last time one of them came
        in (progress elsewhere restarts it)."""
        import sys

        from tqdm import tqdm

        holders = {name: self.claims.holder(identity) for name, identity in points.items()}
        shown = ", ".join(f"{name} (held by {h['host']}:{h['pid']})" if h else name for name, h in holders.items())
        if self.since is None:
            tqdm.write(f"waiting for {len(points)} grid point(s) that other workers hold: {shown}", file=sys.stderr)
        if self.since is None or set(points) != self.points:
            self.since, self.points = time.monotonic(), set(points)
        elif time.monotonic() - self.since > self.deadline:
            raise PruneBenchError(f"gave up after {self.deadline:g} s (PRUNEBENCH_WAIT_S) waiting for {shown}: its "
                                  "holder is alive but has not finished; look at that worker, or run again later")
        time.sleep(POLL_SECONDS)
