"""MLflow tracking: one parent run per experiment, one nested run per grid point, found again by identity.

Uses `MlflowClient` (no process-global active run), so a runner, a tuner and a report can share a store. The
default store is sqlite in the workdir; artifacts go to `<workdir>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import suite
from suite.atomic import locked, within
from suite.errors import ConfigError, StoreError, disk_full, no_space
from suite.run.record import IDENTITY, KIND, NONFINITE, PREFIX, ROLE

ARTIFACTS = "mlartifacts"  # in the workdir: every run's artifacts
LOCK = ".tracking.lock"  # in the workdir: store creation and the parent run happen under it
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, `_-. /`: `ppl.embedded:test@256` -> `ppl.embedded_test_256`."""
    return _BAD_KEY.sub("_", name)


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
        """`create=False` (readers such as reports): refuse a store or experiment that does not exist yet, and write
        nothing, not even into the workdir. The store is `uri`, else `MLFLOW_TRACKING_URI`, else the workdir's
        sqlite file."""
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = store_uri(workdir, uri)
        self.workdir = workdir
        self.name = experiment
        self.base = _sqlite_folder(self.uri)
        if not create:
            db = _sqlite_file(self.uri)
            if db is not None and not db.is_file():
                raise ConfigError(f"no tracking store at {db} (run `prunebench run` first, or name the store with "
                                  "--tracking-uri)")
            with _store_open(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                found = self.client.get_experiment_by_name(experiment)
            if found is None:
                raise ConfigError(f"no experiment {experiment!r} in the tracking store {_shown(self.uri)}")
            self.experiment_id = found.experiment_id
            return
        workdir.mkdir(parents=True, exist_ok=True)
        # opening a sqlite store runs its schema migrations (eagerly, in the client's constructor): two processes
        # doing it at once corrupt it, so the client is made under the lock, and a new store is built aside first
        with locked(workdir / LOCK):
            db = _sqlite_file(self.uri)
            if db is not None:
                _initialise_sqlite(db)
            with _store_open(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    artifacts = within(workdir, ARTIFACTS, experiment).resolve().as_uri()
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
                else:
                    self.experiment_id = found.experiment_id

    def artifact_dir(self, artifact_uri: str) -> Path | None:
        """The local folder of a run's artifacts, or None for a remote artifact store. A sqlite store's artifacts
        are found under the store's own folder (`<workdir>/mlartifacts/...`) wherever they were first written, so
        a moved or copied workdir reads, and writes, its own files, never the original's."""
        if not artifact_uri.startswith("file:"):
            return None
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(artifact_uri).path))
        if self.base is not None and (self.base / ARTIFACTS).is_dir() and ARTIFACTS in path.parts:
            last = len(path.parts) - 1 - path.parts[::-1].index(ARTIFACTS)
            return self.base.joinpath(*path.parts[last:])
        return path

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

    def find_tagged(self, tag: str, value: str) -> Any | None:
        """The latest FINISHED run with this tag value."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    @contextlib.contextmanager
    def fetch_artifacts(self, run: Any) -> Iterator[Path]:
        """A local folder holding `run`'s artifacts: where they are, or a download from a remote artifact store."""
        local = self.artifact_dir(run.info.artifact_uri)
        if local is not None:
            yield local
            return
        with tempfile.TemporaryDirectory() as tmp, _store_errors():
            yield Path(self.client.download_artifacts(run.info.run_id, "", tmp))

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
        numbers = {metric_key(k): float(v) for k, v in (metrics or {}).items() if _number(v)}
        nonfinite = {k: str(v) for k, v in numbers.items() if not _finite(v)}
        if nonfinite:  # recorded, and named, so that a report shows inf where MLflow stored its largest float
            tags = dict(tags or {}) | {NONFINITE: json.dumps(nonfinite, sort_keys=True)}
        p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        m = [Metric(k, v, now, 0) for k, v in numbers.items()]
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

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str | None = None) -> None:
        """Copy `directory`'s files into the run's artifacts (under `artifact_path`), locally where they are local."""
        with _store_errors():
            local = self.artifact_dir(self.client.get_run(run_id).info.artifact_uri)
            if local is None:
                self.client.log_artifacts(run_id, str(directory), artifact_path)
            else:
                shutil.copytree(directory, local / (artifact_path or ""), dirs_exist_ok=True)

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
            self.log_artifacts(run_id, Path(tmp))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run. A run another worker marked KILLED (it took the grid point over) never becomes FINISHED."""
        if status == "FINISHED" and self.client.get_run(run_id).info.status == "KILLED":
            from suite.run.claims import ClaimLost

            raise ClaimLost(f"run {run_id} was marked KILLED by the worker that took its grid point over")
        self.client.set_terminated(run_id, status=status)


def store_uri(workdir: Path, uri: str | None = None) -> str:
    """The tracking store: `uri`, else `MLFLOW_TRACKING_URI`, else sqlite in the workdir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def _initialise_sqlite(db: Path) -> None:
    """Make sure `db` is a complete store (the caller holds the workdir lock). MLflow's schema migrations are not
    atomic, so a new store is built, every migration included, in a temporary file beside it and renamed into
    place: a kill leaves no store or a whole one, never half of one. A store that cannot be opened (half built by an
    older prunebench) is set aside (`<name>.broken-<time>`) and rebuilt when it holds no runs, and refused with one
    line when it does."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for leftover in db.parent.glob(f".{db.name}.*.tmp*"):  # a creator killed mid-build (we hold the lock)
        leftover.unlink(missing_ok=True)
    if db.is_file():
        problem = _unfinished(db)
        if problem is None and _upgrade_aside(db):
            return
        if problem is None:
            try:
                with _store_open(f"sqlite:///{db}"):
                    store = SqlAlchemyStore(f"sqlite:///{db}", str(db.parent / ARTIFACTS))
                    store.search_experiments(max_results=1)  # the schema really is there (tables, columns)
                    store.engine.dispose()
                return
            except StoreError as err:
                if any(word in str(err).lower() for word in ("locked", "busy")):
                    raise  # another process is writing: not a damaged store
                problem = str(err)
        runs = _count_runs(db)
        if runs != 0:
            holds = f"it holds {runs} runs" if runs else "its runs cannot be counted"
            raise StoreError(f"{problem}; {holds}, so it is left as it is: restore it from a backup, or move it "
                             "away to start a new store")
        db.rename(db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}"))
        stale = SqlAlchemyStore._engine_map.pop(f"sqlite:///{db}", None)  # MLflow caches engines per URI
        if stale is not None:
            stale.dispose()
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        with _store_open(f"sqlite:///{tmp}"):
            SqlAlchemyStore(f"sqlite:///{tmp}", str(db.parent / ARTIFACTS)).engine.dispose()
        tmp.replace(db)
    finally:
        tmp.unlink(missing_ok=True)


def _upgrade_aside(db: Path) -> bool:
    """A store written by an older MLflow (an older schema revision), upgraded under the same protection as a new
    one: the migrations run on a copy (SQLite's online backup) that replaces `db` only once they all succeeded, and
    the store as it was stays beside it as `<name>.pre-upgrade-<revision>`. False when `db` is current."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision, _upgrade_db, create_sqlalchemy_engine

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        revision = con.execute("select version_num from alembic_version").fetchone()[0]
    if revision == _get_latest_schema_revision():
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as src, \
                contextlib.closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)
        with _store_open(f"sqlite:///{db}"):
            engine = create_sqlalchemy_engine(f"sqlite:///{tmp}")
            try:
                _upgrade_db(engine)
            finally:
                engine.dispose()
        backup = db.with_name(f"{db.name}.pre-upgrade-{revision}")
        if not backup.exists():
            os.link(db, backup)
        tmp.replace(db)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _unfinished(db: Path) -> str | None:
    """Why a sqlite store is not a finished MLflow schema (no recorded migration), read without writing; None when
    it has one (MLflow then opens it, upgrading an older schema)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute("select version_num from alembic_version").fetchone()
    except sqlite3.Error as err:
        return f"the tracking store {db} is not a complete MLflow store ({err})"
    return None if row else f"the tracking store {db} records no schema version (its creation was interrupted)"


def _count_runs(db: Path) -> int | None:
    """Runs in a sqlite store that MLflow cannot open: 0 when it has no runs table (its creation stopped before
    that), None when it cannot be read (a damaged file is never taken for an empty one)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return int(con.execute("select count(*) from runs").fetchone()[0])
    except sqlite3.OperationalError as err:
        return 0 if "no such table" in str(err) else None
    except sqlite3.Error:
        return None


def run_timings(workdir: Path, uri: str | None = None) -> dict[tuple[str, str], float]:
    """Median wall seconds of a FINISHED pruned run (pruning, evaluation and recording) per (model, method), over
    every experiment of the store; {} where there is no store yet (a sqlite file is never created to find out) or
    it cannot be read. What `validate` estimates a sweep's time from."""
    import statistics

    from mlflow.tracking import MlflowClient

    target = store_uri(workdir, uri)
    db = _sqlite_file(target)
    if db is not None and not db.is_file():
        return {}
    try:
        client = MlflowClient(tracking_uri=target)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.`{KIND}` = 'pruned' and attributes.status = 'FINISHED'",
                                  max_results=50_000) if ids else []
    except Exception:  # a store this version cannot read: no estimate, never an error from validate
        return {}
    seconds: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run.info.end_time and run.info.start_time:
            key = (run.data.params.get("model", ""), run.data.params.get("method", ""))
            seconds.setdefault(key, []).append((run.info.end_time - run.info.start_time) / 1000)
    return {key: statistics.median(values) for key, values in seconds.items()}


def _sqlite_file(uri: str) -> Path | None:
    """A sqlite store's file, or None for a server database."""
    return Path(uri.split("///", 1)[1]) if uri.startswith("sqlite:///") else None


def _sqlite_folder(uri: str) -> Path | None:
    """The folder of a sqlite store's file (where its `mlartifacts` live), or None for a server database."""
    db = _sqlite_file(uri)
    return None if db is None else db.resolve().parent


def _shown(uri: str) -> str:
    """A store URI for messages, without a password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", uri)


@contextlib.contextmanager
def _store_open(uri: str) -> Iterator[None]:
    """A store that cannot be opened (server down, bad URI) is one line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:  # MLflow raises MlflowException, SQLAlchemy's OperationalError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StoreError(f"cannot open the tracking store {_shown(uri)}: {first[:300]}") from None


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if no_space(err) is not None:
            raise disk_full(err, Path(err.filename or ".")) from None
        raise StoreError(f"cannot write to the artifact store: {err}") from None


def _number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, str)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(float(v))
