"""MLflow tracking: one parent run per experiment, one nested run per grid point, found again by identity.

Uses `MlflowClient` (no process-global active run), so a runner, a tuner and a report can share a store. The
default store is sqlite in the workdir; artifacts go to `<workdir>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import suite
from suite.atomic import locked
from suite.errors import ConfigError, StoreError

PREFIX = "prunebench."
ROLE, IDENTITY, ERROR = PREFIX + "role", PREFIX + "identity", PREFIX + "error"
LOCK = ".tracking.lock"  # in the workdir: store creation and the parent run happen under it
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, `_-. /`: `ppl.embedded:test@256` -> `ppl.embedded_test_256`."""
    return _BAD_KEY.sub("_", name)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: value}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(suite.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The MLflow experiment of one prunebench experiment."""

    def __init__(self, workdir: Path, experiment: str, uri: str | None = None, create: bool = True) -> None:
        """`create=False` (readers such as reports): refuse a store or experiment that does not exist yet."""
        import logging

        from mlflow.tracking import MlflowClient

        if not create and uri is None and not (workdir / "mlflow.db").is_file():
            raise ConfigError(f"no tracking store at {workdir / 'mlflow.db'} (run `prunebench run` first)")

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        workdir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
        # opening a sqlite store runs its schema migrations (eagerly, in the client's constructor): two processes
        # doing it at once corrupt it, so the client is made under the lock
        self.workdir = workdir
        with locked(workdir / LOCK):
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None and not create:
                raise ConfigError(f"no experiment {experiment!r} in the store of {workdir}")
            if found is None:
                artifacts = (workdir / "mlartifacts" / experiment).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                self.experiment_id = found.experiment_id
        self.name = experiment

    def reopen(self, run_id: str) -> None:
        """A resumed sweep's parent is RUNNING again until the sweep ends."""
        self.client.update_run(run_id, status="RUNNING")

    def parent(self) -> str:
        """The experiment's parent run (created once, reused on every resume; one even when workers start at once)."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{ROLE}` = 'parent'", max_results=1)
        if runs:
            return runs[0].info.run_id
        with locked(self.workdir / LOCK):
            runs = self.client.search_runs([self.experiment_id], f"tags.`{ROLE}` = 'parent'", max_results=1)
            if runs:
                return runs[0].info.run_id
            run = self.client.create_run(self.experiment_id, run_name=self.name,
                                         tags={ROLE: "parent", PREFIX + "suite_version": suite.__version__})
            return run.info.run_id

    def find(self, identity: str, status: str = "FINISHED") -> Any | None:
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`{IDENTITY}` = '{identity}' and attributes.status = '{status}'",
                                       max_results=1)
        return runs[0] if runs else None

    def latest(self, identity: str) -> Any | None:
        """The most recently started run of a grid point, whatever its status."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{IDENTITY}` = '{identity}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def kill_orphans(self, identity: str) -> None:
        """Runs of a grid point left RUNNING by a killed process (the caller holds its claim): marked KILLED."""
        for run in self.client.search_runs([self.experiment_id],
                                           f"tags.`{IDENTITY}` = '{identity}' and attributes.status = 'RUNNING'"):
            self.finish(run.info.run_id, "KILLED")

    def start(self, name: str, identity: str, tags: Mapping[str, str]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: self.parent(), IDENTITY: identity, PREFIX + "git_commit": git_commit(),
                PREFIX + "suite_version": suite.__version__, **tags}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
            tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        m = [Metric(metric_key(k), float(v), now, 0) for k, v in (metrics or {}).items() if _finite(v)]
        t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(m), len(t), 1), 100):
            self.client.log_batch(run_id, metrics=m[i : i + 100], params=p[i : i + 100], tags=t[i : i + 100])

    def log_curves(self, run_id: str, curves: Mapping[str, Iterable[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(metric_key(f"curve.{k}"), float(v), now, step)
                  for k, values in curves.items() for step, v in enumerate(values) if _finite(v)]
        for i in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[i : i + 1000])

    def log_artifacts(self, run_id: str, directory: Path) -> None:
        with _store_errors():
            self.client.log_artifacts(run_id, str(directory))

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        with _store_errors():
            self.client.log_text(run_id, json.dumps(data, indent=1, sort_keys=True, default=str), name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise StoreError(f"cannot write to the artifact store: {err}") from None


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and abs(f) != float("inf")
