"""Run an experiment: expand the grid, skip what is FINISHED, prune + evaluate the rest, record everything.

Every grid point has an identity: a hash of all that determines its result (model weights fingerprint, method
and resolved hyperparameters, target, seed, calibration spec and the content hash of its text, evaluation spec and
the content hashes of its texts and task items, and a fingerprint of the code: version and source hash). A
FINISHED run with the same identity is never repeated, so a crashed sweep resumes where it stopped. Each dense
model is evaluated once per protocol and reused for every retained-% number.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import suite
from suite.atomic import within
from suite.claims import ClaimLost, Claims, lease_seconds, open_claims, wait_seconds
from suite.config import Experiment
from suite.errors import ConfigError, PruneBenchError
from suite.evaluate import EvalSpec, PplSpec
from suite.tracking import ERROR, PREFIX, Tracker, flatten

log = logging.getLogger(__name__)
KIND = PREFIX + "kind"
WORKER = PREFIX + "worker"
PRUNING = PREFIX + "pruning_identity"
PRUNED_BY = PREFIX + "pruned_by"  # on a run that re-evaluated another run's pruning: that run's id
MODEL_ARTIFACT = "model"  # the compact checkpoint, stored when a method rewrote weights
POLL_SECONDS = 2.0  # how often a worker looks again at grid points another worker holds


@dataclass(frozen=True)
class RunSpec:
    """One grid point, fully resolved."""

    model: str
    label: str
    method: str
    hyperparameters: dict[str, Any]
    sparsity: float
    seed: int
    target: dict[str, Any]
    granularity: str
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    dtype: str
    calibration_data: str = ""  # content hash of the calibration source's splits
    evaluation_data: dict[str, Any] = field(default_factory=dict)  # content hashes of perplexity texts and task items
    code: str = ""  # code_fingerprint(): a fix to a pruner or the suite makes every identity new
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self, fingerprint: str) -> str:
        """The run: its pruning and its evaluation."""
        return _digest(asdict(self) | {"model_fingerprint": fingerprint})

    def pruning_identity(self, fingerprint: str) -> str:
        """The pruning alone (model, method, hyperparameters, target, seed, calibration and its data, dtype, code): a
        run under a new evaluation protocol reuses the masks (and rewritten weights) of a FINISHED run with it."""
        body = {k: v for k, v in asdict(self).items() if k not in ("evaluation", "evaluation_data")}
        return _digest(body | {"model_fingerprint": fingerprint})

    @property
    def name(self) -> str:
        return f"{self.model.removeprefix('zoo:')}/{self.label}/sp{self.sparsity}/seed{self.seed}"


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]


@functools.cache
def code_fingerprint() -> str:
    """The code a result came from: the package version and a hash of every source file of prunebench's packages
    (suite, ddp, baselines), so a resumed sweep never reuses a result that older code produced. Method plugins
    outside these packages add their own module's hash in `method_fingerprint`."""
    h = hashlib.sha256(suite.__version__.encode())
    root = Path(suite.__file__).resolve().parent.parent
    for package in ("suite", "ddp", "baselines"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{suite.__version__}+{h.hexdigest()[:12]}"


def method_fingerprint(name: str) -> str:
    """`code_fingerprint()`, plus the source of the method's own module when a plugin defines it elsewhere."""
    import inspect

    from suite.pruner import get_method

    base = code_fingerprint()
    source = inspect.getsourcefile(get_method(name))
    root = Path(suite.__file__).resolve().parent.parent
    if source is None or Path(source).resolve().is_relative_to(root):
        return base
    return f"{base}+{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:12]}"


def data_fingerprint(exp: Experiment) -> tuple[str, dict[str, Any]]:
    """Content hashes of the texts the runs read: the calibration source's splits, and each perplexity window's
    split and each embedded task's items (a hub task: its lm-eval version). Two workers on different interpreters
    (the embedded corpus is the stdlib's source) or on edited data never share a result."""
    import lm_eval

    from suite.data import load_source
    from suite.tasks import task_dir

    calibration = load_source(exp.calibration.source)
    text = json.dumps(calibration.hashes, sort_keys=True)
    evaluation: dict[str, Any] = {"ppl": {}, "tasks": {}}
    for p in eval_spec(exp).ppl:
        evaluation["ppl"][str(p)] = load_source(p.source).hashes.get(p.split)
    if exp.evaluation.tasks:
        embedded = task_dir("test")[1]
        evaluation["tasks"] = {t: embedded.get(t, f"lm-eval {lm_eval.__version__}") for t in exp.evaluation.tasks}
    return hashlib.sha256(text.encode()).hexdigest()[:16], evaluation


def model_fingerprint(spec: str) -> str:
    """Content hash of a local checkpoint (config + weights), or the hub id (its cache pins the revision)."""
    from suite.models import resolve

    where = resolve(spec)
    if not isinstance(where, Path):
        return f"hub:{where}"
    h = hashlib.sha256()
    for path in sorted(where.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin"):
            h.update(path.name.encode())
            if path.stat().st_size < 512 * 2**20:
                h.update(path.read_bytes())
            else:  # multi-GB shards: name, size and mtime stand in for the bytes
                h.update(f"{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def preflight(exp: Experiment, workdir: Path, tuning: bool = False) -> list[RunSpec]:
    """Everything that can be known wrong before any store is touched, and the grid it would run. `validate`,
    `run` and `tune` call this first, so validate says ok exactly when run will start: every model resolves (a
    local checkpoint of a supported family, a zoo model, or a hub id that is cached or reachable now), the
    calibration and evaluation texts load, the tasks exist, every method accepts its hyperparameters and target,
    tuned methods have their tuning results, and the tuning section (when given, or for `tune`) names real labels
    and hyperparameters. A sweep that cannot start fails here with one line and leaves the store as it was."""
    from suite.evaluate import check_positions, check_tasks
    from suite.hub import hub_unreachable_reason, is_cached, require_hub
    from suite.masks import Target
    from suite.modeling_prunebench import MODEL_TYPE_PREFIX
    from suite.models import resolve
    from suite.pruner import get_method
    from suite.structures import FAMILIES
    from suite.tuning import search_spaces

    for spec in exp.models:
        where = resolve(spec)
        if isinstance(where, Path):
            config = json.loads((where / "config.json").read_text())
            model_type = config.get("model_type", "").removeprefix(MODEL_TYPE_PREFIX)
            if model_type not in FAMILIES:
                raise ConfigError(f"{spec}: unsupported model family {model_type!r}; supported: "
                                  f"{', '.join(sorted(FAMILIES))}")
            lengths = {"calibration.seq_len": exp.calibration.seq_len} | {f"evaluation.ppl {p}": p.seq_len
                                                                         for p in eval_spec(exp).ppl}
            try:
                check_positions(SimpleNamespace(**config), lengths)
            except ConfigError as err:
                raise ConfigError(f"{spec}: {err}") from None
        elif not is_cached(where, "config.json") and hub_unreachable_reason() is not None:
            require_hub(f"model {where!r}")
    lease_seconds()  # a malformed PRUNEBENCH_LEASE_S or PRUNEBENCH_WAIT_S is refused before anything starts
    wait_seconds()
    data = data_fingerprint(exp)  # loads, so checks, the calibration and evaluation texts (each once)
    check_tasks(tuple(exp.evaluation.tasks))
    if exp.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor.kind 'ray' needs Ray: pip install 'prunebench[ray]'")
    if tuning or exp.tuning != type(exp.tuning)():  # a tuning section that says anything is checked
        search_spaces(exp)
    specs = expand(exp, workdir, require_tuned=not tuning, data=data)
    for spec in {(s.label, s.method, s.sparsity): s for s in specs}.values():
        method = get_method(spec.method)
        try:
            method(method.Config(**spec.hyperparameters)).check_target(Target(**spec.target))
        except ConfigError as err:
            raise ConfigError(f"methods.{spec.label}: {err}") from None
    return specs


def eval_spec(exp: Experiment) -> EvalSpec:
    e = exp.evaluation
    return EvalSpec(tasks=tuple(e.tasks), ppl=tuple(PplSpec.parse(p) for p in e.ppl), limit=e.limit,
                    batch_size=e.batch_size, dtype=exp.dtype)


def tuned_path(workdir: Path, experiment: str, label: str, model: str) -> Path:
    slug = model.replace("/", "_").replace(":", "_")
    return within(workdir, "tuned", experiment, label, f"{slug}.json")


def expand(exp: Experiment, workdir: Path, require_tuned: bool = True,
           data: tuple[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """The grid in a stable order: model, method, sparsity, seed. A `tuned: true` method takes its tuning result's
    best parameters; without one it is refused (`require_tuned`, for run) or keeps its own (for tune, which makes
    them). `data`: `data_fingerprint(exp)`, computed here when not given."""
    calibration_data, evaluation_data = data if data is not None else data_fingerprint(exp)
    specs = []
    for model in exp.models:
        for entry in exp.methods:
            params = dict(entry.params)
            if entry.tuned:
                path = tuned_path(workdir, exp.name, entry.key, model)
                if path.is_file():
                    params |= json.loads(path.read_text())["best_params"]
                elif require_tuned:
                    raise ConfigError(f"methods.{entry.key}: tuned: true but no tuning result for {model} "
                                      f"(run `prunebench tune` first; looked for {path})")
            from suite.pruner import get_method

            hyper = get_method(entry.name).Config(**params).model_dump(mode="json")
            for sparsity in exp.sparsities:
                for seed in exp.seeds:
                    specs.append(RunSpec(
                        model=model, label=entry.key, method=entry.name, hyperparameters=hyper, sparsity=sparsity,
                        seed=seed, target=exp.target.model_dump(mode="json") | {"sparsity": sparsity},
                        granularity=exp.granularity, calibration=exp.calibration.model_dump(mode="json"),
                        evaluation=exp.evaluation.model_dump(mode="json"), dtype=exp.dtype,
                        calibration_data=calibration_data, evaluation_data=evaluation_data,
                        code=method_fingerprint(entry.name),
                    ))
    return specs


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Evaluation result -> flat MLflow metrics (ppl.<spec>, acc.<task>, acc_norm.<task>, mean_acc)."""
    out = {f"{prefix}ppl.{name}": r["ppl"] for name, r in result["ppl"].items()}
    for task, r in result["tasks"].items():
        out[f"{prefix}acc.{task}"] = r["acc"]
        out[f"{prefix}acc_norm.{task}"] = r["acc_norm"]
    if "mean_acc" in result:
        out[f"{prefix}mean_acc"] = result["mean_acc"]
    return out


class Runner:
    """Executes an experiment against one tracking store, in this process or one Ray task per grid point."""

    def __init__(self, exp: Experiment, workdir: Path, fail_fast: bool = False, progress: bool = True) -> None:
        self.specs = preflight(exp, workdir)  # before the store is opened (or created)
        self.exp = exp
        self.workdir = workdir
        self.fail_fast = fail_fast
        self.progress = progress
        self.tracker = Tracker(workdir, exp.tracking.experiment or exp.name, exp.tracking.uri)
        self.spec = eval_spec(exp)
        self._calibration: dict[str, Any] = {}
        self._speed_reference: tuple[str | None, Any] = (None, None)

    def run(self) -> list[dict[str, Any]]:
        specs = self.specs
        parent = self.tracker.parent()
        self.tracker.reopen(parent)
        rows: list[dict[str, Any]] = []
        try:
            with open_claims(self.workdir, self.tracker.uri) as claims:
                self._sweep(specs, rows, claims)
        except BaseException as err:  # the parent says how the sweep ended: FAILED on an error, KILLED on Ctrl-C
            self.tracker.finish(parent, "FAILED" if isinstance(err, Exception) else "KILLED")
            raise
        self.tracker.finish(parent, "FINISHED" if all(r["status"] == "FINISHED" for r in rows) else "FAILED")
        return rows

    def _sweep(self, specs: list[RunSpec], rows: list[dict[str, Any]], claims: Claims) -> None:
        """Every grid point once: found FINISHED, or run under a claim (here, or in a Ray task per point). Points
        another worker holds are waited for at the end (its result is taken, or the point taken over if it died)."""
        from tqdm import tqdm

        started = int(time.time() * 1000)
        bar = tqdm(total=len(specs), desc=f"{self.exp.name}", unit="run", disable=None if self.progress else True)
        for model in dict.fromkeys(s.model for s in specs):
            fingerprint = model_fingerprint(model)
            dense = self._dense(model, fingerprint, claims)
            pending = [s for s in specs if s.model == model]
            if self.exp.executor.kind == "ray":
                pending = self._on_ray(pending, fingerprint, dense, rows, bar, started)
            waiting = Waiting(claims)
            while pending:
                held_elsewhere = []
                for spec in pending:
                    bar.set_postfix_str(spec.name)
                    row = self.point(spec, fingerprint, dense, claims, started)
                    if row is None:
                        held_elsewhere.append(spec)
                        continue
                    rows.append(row)
                    bar.update(1)
                if held_elsewhere:
                    waiting.on({s.name: s.identity(fingerprint) for s in held_elsewhere})
                pending = held_elsewhere
        bar.close()
        grid = {(s.model, s.label, s.sparsity, s.seed): i for i, s in enumerate(specs)}
        rows.sort(key=lambda r: grid[(r["model"], r["method"], r["sparsity"], r["seed"])])

    def point(self, spec: RunSpec, fingerprint: str, dense: dict[str, float], claims: Claims,
              started: int) -> dict[str, Any] | None:
        """One grid point's table row (None while another worker holds it)."""
        identity = spec.identity(fingerprint)
        run = self._once(identity, claims, started, partial(self._execute, spec, identity, fingerprint, dense))
        return None if run is None else _row(spec, run)

    def _on_ray(self, specs: list[RunSpec], fingerprint: str, dense: dict[str, float], rows: list[dict[str, Any]],
                bar: Any, started: int) -> list[RunSpec]:
        """One Ray task per grid point, with the executor's resource request; each task runs the point exactly as a
        local worker would (claim, execute, record into the same tracking store). Returns the points whose task
        found them held by another worker (the caller waits for those)."""
        import ray

        ex = self.exp.executor
        ours = not ray.is_initialized()
        if ours and ex.address in (None, "local"):
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        elif ours:
            try:
                ray.init(address=ex.address, log_to_driver=False)
            except Exception as err:  # Ray raises ConnectionError, RuntimeError, ... for an unreachable cluster
                raise ConfigError(f"executor.address {ex.address!r}: cannot join the Ray cluster: "
                                  f"{_one_line(err)}") from None
        try:
            # a task whose worker or node dies is retried (Ray's default 3 times): claims make a point idempotent
            task = ray.remote(_ray_point).options(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_retries=3)
            config = self.exp.model_dump(mode="json")
            workdir = str(self.workdir.resolve())
            futures = {task.remote(config, workdir, spec, fingerprint, dense, started): spec for spec in specs}
            held = []
            waiting = list(futures)
            while waiting:  # collected as they finish: one slow or lost task holds up no other result
                (future,), waiting = ray.wait(waiting, num_returns=1)
                spec = futures[future]
                try:
                    row = ray.get(future)
                except ray.exceptions.RayError as err:  # retries spent, or the task raised: the driver takes it over
                    log.warning("%s: Ray task lost after its retries (%s); this worker runs it", spec.name,
                                _one_line(err))
                    row = None
                if row is None:
                    held.append(spec)
                    continue
                rows.append(row)
                bar.update(1)
            return held
        finally:
            if ours:
                ray.shutdown()

    def _once(self, identity: str, claims: Claims, started: int | None, execute: Any) -> Any | None:
        """The grid point's run: FINISHED already, FAILED by another worker since `started` (not retried twice;
        None: a failure is always retried), or executed now under a claim; None while another live worker holds it."""
        done = self.tracker.find(identity)
        if done is not None:
            return done
        latest = self.tracker.latest(identity) if started is not None else None
        if latest is not None and latest.info.status == "FAILED" and latest.info.start_time >= started:
            return latest
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

    def _dense(self, model: str, fingerprint: str, claims: Claims) -> dict[str, float]:
        """Dense metrics for this protocol: measured once (by one worker), then found by identity."""
        identity = hashlib.sha256(json.dumps(
            {"dense": model, "fp": fingerprint, "eval": self.exp.evaluation.model_dump(mode="json"),
             "dtype": self.exp.dtype, "code": code_fingerprint(), "data": self.specs[0].evaluation_data},
            sort_keys=True).encode()).hexdigest()[:20]
        waiting = Waiting(claims)
        while True:
            run = self._once(identity, claims, None, partial(self._measure_dense, model, identity))
            if run is not None:
                return dict(run.data.metrics)
            waiting.on({f"{model.removeprefix('zoo:')}/dense": identity})

    def _measure_dense(self, model: str, identity: str, fence: Callable[[], None]) -> Any:
        from suite.evaluate import evaluate
        from suite.models import load_model

        run_id = self.tracker.start(f"{model.removeprefix('zoo:')}/dense", identity,
                                    {KIND: "dense", PREFIX + "model": model, PREFIX + "code": code_fingerprint()})
        try:
            m, tok = load_model(model, self.exp.dtype)
            result = evaluate(m, tok, self.spec)
            metrics = flat_metrics(result) | {"params_dense": sum(p.numel() for p in m.parameters())}
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
            self.tracker.log(run_id, tags={ERROR: _one_line(err)})
            self.tracker.finish(run_id, "FAILED")
            raise

    def _calibration_for(self, model: str, tokenizer: Any) -> Any:
        """One calibration set per model, identical (same hash) for every method."""
        if model not in self._calibration:
            self._calibration[model] = self.exp.calibration.build(tokenizer)
        return self._calibration[model]

    def _dense_model(self, model: str) -> Any:
        """The dense model for speed ratios (when measured), loaded once per model."""
        if not self.exp.evaluation.speed:
            return None
        if self._speed_reference[0] != model:
            from suite.models import load_model

            self._speed_reference = (model, load_model(model, self.exp.dtype)[0])
        return self._speed_reference[1]

    def _execute(self, spec: RunSpec, identity: str, fingerprint: str, dense: dict[str, float],
                 fence: Callable[[], None]) -> Any:
        """Prune (or reuse an earlier pruning), evaluate and record one grid point; `fence` raises ClaimLost once
        this worker no longer holds the point, and is called before every write of its result."""
        from suite.models import load_model

        pruning = spec.pruning_identity(fingerprint)
        tags = {KIND: "pruned", PREFIX + "model": spec.model, PREFIX + "method": spec.method,
                PREFIX + "label": spec.label, PREFIX + "model_fingerprint": fingerprint, WORKER: worker(),
                PRUNING: pruning, PREFIX + "code": spec.code}
        source = self.tracker.find_tagged(PRUNING, pruning)
        run_id = self.tracker.start(spec.name, identity, tags)
        try:
            dense_model = self._dense_model(spec.model)
            reused = None if source is None else self._reuse(spec, source)
            if reused is not None:
                model, tokenizer, outcome = reused
                self.tracker.log(run_id, tags={PRUNED_BY: source.info.run_id})
            else:
                model, tokenizer = load_model(spec.model, spec.dtype)
                outcome = self._prune(spec, model, tokenizer)
            self._record(run_id, spec, model, tokenizer, outcome.metrics, outcome.result, dense, dense_model, fence)
            for level, masks in sorted(outcome.result.nested.items()):  # logged before the parent finishes
                self._nested(spec, pruning, fingerprint, tags, level, masks, outcome.metrics, dense, dense_model,
                             fence)
            fence()
            self.tracker.finish(run_id)
        except ClaimLost:
            raise
        except Exception as err:  # a sweep records the failure and goes on (--fail-fast re-raises)
            self._failed(run_id, spec, err)
        return self.tracker.client.get_run(run_id)

    def _prune(self, spec: RunSpec, model: Any, tokenizer: Any) -> Any:
        from suite.masks import Target
        from suite.pipeline import prune_model
        from suite.pruner import get_method

        method = get_method(spec.method)
        calibration = self._calibration_for(spec.model, tokenizer)  # data-free methods ignore it
        return prune_model(model, spec.method, method.Config(**spec.hyperparameters), Target(**spec.target),
                           seed=spec.seed, granularity=spec.granularity, calibration=calibration)

    def _reuse(self, spec: RunSpec, source: Any) -> tuple[Any, Any, Any] | None:
        """The compact model and pruning outcome of `source`, a FINISHED run of the same pruning identity, without
        pruning again: its stored checkpoint where the method rewrote weights, otherwise the dense model compacted
        to its masks (and checked compact == gated again). Its prune metrics, diagnostics and curves carry over.
        None when the masks cannot replay it (weights rewritten, or not known not to be, and no checkpoint stored):
        then the run prunes again."""
        from suite.compact import load_pruned
        from suite.masks import Masks
        from suite.models import load_model, load_tokenizer, parse_dtype
        from suite.pipeline import PruneOutcome, compact_and_measure
        from suite.pruner import PruneResult
        from suite.structures import build_structure

        with self.tracker.fetch_artifacts(source) as files:
            stored = json.loads((files / "metrics.json").read_text())
            stored.pop("evaluation", None)
            checkpoint = (files / MODEL_ARTIFACT).is_dir()
            if not checkpoint and stored.get("weights_changed") is not False:
                return None
            masks = Masks.load(files)
            nested = {float(d.name.removeprefix("sp")): Masks.load(d) for d in sorted((files / "nested").glob("sp*"))}
            curves = json.loads((files / "curves.json").read_text()) if (files / "curves.json").is_file() else {}
            if checkpoint:
                model = load_pruned(files / MODEL_ARTIFACT, parse_dtype(spec.dtype))
                tokenizer = load_tokenizer(spec.model)  # the dense weights are not needed
                metrics = stored
            else:
                model, tokenizer = load_model(spec.model, spec.dtype)
                structure = build_structure(model, spec.granularity)
                metrics = stored | compact_and_measure(model, structure, masks, spec.seed)
        return model, tokenizer, PruneOutcome(PruneResult(masks, curves=curves, nested=nested), metrics)

    def _nested(self, spec: RunSpec, pruning: str, fingerprint: str, tags: dict[str, str], level: float,
                masks: Any, parent_metrics: dict[str, Any], dense: dict[str, float], dense_model: Any,
                fence: Callable[[], None]) -> None:
        """A lower-sparsity subnetwork the method met on the way (GISP): its own row, on a fresh copy of the model
        (`pruning`: the parent's pruning identity, so a re-evaluation finds the same nested rows)."""
        from dataclasses import replace

        from suite.models import load_model
        from suite.pipeline import compact_and_measure
        from suite.pruner import PruneResult
        from suite.structures import build_structure

        nested = replace(spec, sparsity=level, target=spec.target | {"sparsity": level},
                         extra=spec.extra | {"nested_in": pruning})
        nested_id = nested.identity(fingerprint)
        if self.tracker.find(nested_id) is not None:
            return
        self.tracker.kill_orphans(nested_id)  # left RUNNING by a killed worker (the parent's claim covers it)
        run_id = self.tracker.start(nested.name, nested_id, tags | {PREFIX + "nested_in": pruning,
                                                                    PRUNING: nested.pruning_identity(fingerprint)})
        try:
            model, tokenizer = load_model(spec.model, spec.dtype)
            structure = build_structure(model, spec.granularity)
            masks.meta |= {"method": spec.method, "seed": spec.seed, "target": nested.target, "nested_in": pruning}
            metrics = parent_metrics | compact_and_measure(model, structure, masks, spec.seed)
            self._record(run_id, nested, model, tokenizer, metrics, PruneResult(masks), dense, dense_model, fence)
            fence()
            self.tracker.finish(run_id)
        except ClaimLost:
            raise
        except Exception as err:
            self._failed(run_id, nested, err)

    def _failed(self, run_id: str, spec: RunSpec, err: Exception) -> None:
        log.debug("run %s failed", spec.name, exc_info=True)
        self.tracker.log(run_id, tags={ERROR: _one_line(err)})
        self.tracker.finish(run_id, "FAILED")
        if self.fail_fast:
            raise err

    def _record(self, run_id: str, spec: RunSpec, model: Any, tokenizer: Any, prune_metrics: dict[str, Any],
                result: Any, dense: dict[str, float], dense_model: Any, fence: Callable[[], None]) -> None:
        """Evaluate the compact model and log params, metrics (pruned, dense, retained %), curves and artifacts."""
        from suite.evaluate import evaluate, speed

        evaluation = evaluate(model, tokenizer, self.spec)
        fence()
        numbers = prune_metrics.items()
        metrics = {k: v for k, v in numbers if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics |= flat_metrics(evaluation)
        metrics |= {f"dense.{k}": v for k, v in dense.items()}
        for key, value in flat_metrics(evaluation).items():
            if dense.get(key):
                metrics[f"retained.{key}"] = 100 * value / dense[key]
        if dense_model is not None:
            metrics |= {f"speed.{k}": v for k, v in speed(model, dense_model).items()}
        params = {"model": spec.model, "method": spec.method, "label": spec.label, "sparsity": spec.sparsity,
                  "seed": spec.seed, "granularity": spec.granularity, "dtype": spec.dtype}
        params |= flatten("hp", spec.hyperparameters) | flatten("target", spec.target)
        params |= flatten("calibration", spec.calibration)
        params["calibration.hash"] = prune_metrics["calibration_hash"]
        self.tracker.log(run_id, params=params, metrics=metrics, tags=protocol_tags(evaluation["protocol"]))
        self.tracker.log_curves(run_id, result.curves)
        self._artifacts(run_id, spec, model, prune_metrics, result, evaluation)

    def _artifacts(self, run_id: str, spec: RunSpec, model: Any, prune_metrics: dict[str, Any], result: Any,
                   evaluation: dict[str, Any]) -> None:
        from reports.heatmaps import plot_masks
        from suite.compact import save_pruned

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            result.save(d)
            (d / "metrics.json").write_text(json.dumps(prune_metrics | {"evaluation": evaluation}, indent=1,
                                                       sort_keys=True, default=str))
            keep = {n: k.numpy() for n, k in result.masks.keep.items()}
            plot_masks(keep, d / "heatmap", title=spec.name)
            if prune_metrics.get("weights_changed") and self.exp.tracking.store_models:  # masks cannot replay it
                save_pruned(model, d / MODEL_ARTIFACT)
            self.tracker.log_artifacts(run_id, d)


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


def _ray_point(config: dict[str, Any], workdir: str, spec: RunSpec, fingerprint: str, dense: dict[str, float],
               started: int) -> dict[str, Any] | None:
    """A Ray task: one grid point, through a Runner of its own on the shared workdir and tracking store (the model
    fingerprint and dense metrics come from the driver, which already has them)."""
    from suite.models import quiet_transformers

    quiet_transformers()
    runner = Runner(Experiment.model_validate(config), Path(workdir), progress=False)
    with open_claims(runner.workdir, runner.tracker.uri) as claims:
        return runner.point(spec, fingerprint, dense, claims, started)


def worker() -> str:
    """Which process executed a run (host:pid), so a shared sweep shows how its workers split it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def protocol_tags(protocol: dict[str, Any]) -> dict[str, str]:
    """The protocol hash to group by, and its body so a report can say how two protocols differ."""
    return {PREFIX + "protocol": protocol["hash"], PREFIX + "protocol_body": json.dumps(protocol, sort_keys=True)}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if not isinstance(err, PruneBenchError) else text


def _row(spec: RunSpec, run: Any) -> dict[str, Any]:
    m = run.data.metrics
    ppl = next((v for k, v in sorted(m.items()) if k.startswith("ppl.")), float("nan"))
    return {"model": spec.model, "method": spec.label, "sparsity": spec.sparsity, "seed": spec.seed,
            "status": run.info.status, "ppl": ppl, "mean_acc": m.get("mean_acc", float("nan")),
            "retained_acc_%": m.get("retained.mean_acc", float("nan")),
            "params": int(m.get("params_compact", 0)), "prune_s": m.get("prune_seconds", float("nan")),
            "error": run.data.tags.get(ERROR, "")}


def results_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    if not rows:
        return "(no runs)"
    df = pd.DataFrame(rows)
    if not df["error"].astype(bool).any():
        df = df.drop(columns="error")
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
