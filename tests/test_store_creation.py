"""The tracking store survives its own creation: SIGKILL at random moments while a first `prunebench run` builds a
new sqlite store never leaves a store that later commands cannot open (MLflow's migrations are not atomic; the
store is built aside and renamed into place). PRUNEBENCH_KILL_LOOP=N sets the number of kills (default 4)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import yaml

from suite.run.tracking import Tracker
from suite.testing import tiny_text_model


def _opens(db) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        return True
    except Exception:  # any failure to open is what this test counts
        return False


def test_killing_the_first_run_while_it_builds_the_store_never_breaks_it(tmp_path):
    model = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "kill", "models": [str(model)], "methods": [{"name": "random"}], "sparsities": [0.3],
           "calibration": {"n": 4, "seq_len": 32, "valid_n": 0},
           "evaluation": {"ppl": ["embedded:test@64/2"], "tasks": [], "limit": 2}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    rng = random.Random(0)
    kills = int(os.environ.get("PRUNEBENCH_KILL_LOOP", "4"))
    broken, hit = 0, 0
    for i in range(kills):
        workdir = tmp_path / f"w{i}"
        cmd = [sys.executable, "-m", "prunebench.cli", "run", str(tmp_path / "exp.yaml"), "--workdir", str(workdir)]
        worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (workdir.exists() and any(workdir.glob("*mlflow.db*"))):  # the build has begun
            assert worker.poll() is None and time.time() < deadline, "the run ended before building its store"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.2))  # somewhere in the build (about a second here) or just after
        hit += not (workdir / "mlflow.db").is_file()
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
        db = workdir / "mlflow.db"
        if db.is_file() and not _opens(db):
            broken += 1
        Tracker(workdir, "kill")  # and the next command on that workdir opens (or finishes building) its store
    print(f"{kills} kills, {hit} inside the build, {broken} broken stores")
    assert broken == 0
    assert hit > 0  # the kills did land in the window this test is about


def test_a_half_built_store_is_set_aside_when_empty_and_refused_when_it_holds_runs(tmp_path):
    """What an interrupted build by an older version left: rebuilt when it holds no runs (the broken file kept
    beside it), one line when it holds runs (and the file left exactly as it was)."""
    import sqlite3

    import pytest

    from suite.errors import StoreError

    empty = tmp_path / "empty"
    empty.mkdir()
    with sqlite3.connect(empty / "mlflow.db") as con:  # migrations stopped half way: a table, no version
        con.execute("create table experiments (experiment_id integer primary key, name text)")
    Tracker(empty, "x")
    assert _opens(empty / "mlflow.db") and len(list(empty.glob("mlflow.db.broken-*"))) == 1
    full = tmp_path / "full"
    full.mkdir()
    with sqlite3.connect(full / "mlflow.db") as con:
        con.execute("create table runs (run_uuid text primary key)")
        con.execute("insert into runs values ('r1')")
        con.execute("create table experiments (experiment_id integer primary key, name text, bogus text)")
    before = (full / "mlflow.db").read_bytes()
    with pytest.raises(StoreError, match="holds 1 runs"):
        Tracker(full, "x")
    assert (full / "mlflow.db").read_bytes() == before


def test_a_store_of_an_older_mlflow_is_upgraded_aside_and_kept_when_the_upgrade_fails(tmp_path, monkeypatch):
    """A store at the previous schema revision: its upgrade runs on a copy that replaces it only when every migration
    succeeded (the store as it was kept as `mlflow.db.pre-upgrade-<rev>`); an upgrade that dies half way leaves the
    store byte for byte as it was, with one line."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import pytest
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    from suite.errors import StoreError

    head = db_utils._get_latest_schema_revision()
    previous = ScriptDirectory.from_config(db_utils._get_alembic_config("")).get_revision(head).down_revision

    def old_store(folder):
        folder.mkdir()
        engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{folder / 'mlflow.db'}")
        InitialBase.metadata.create_all(engine)
        config = db_utils._get_alembic_config(str(engine.url))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, previous)
        engine.dispose()
        with sqlite3.connect(folder / "mlflow.db") as con:
            con.execute("insert into experiments (name, artifact_location, lifecycle_stage) "
                        "values ('old', 'file:///nowhere', 'active')")
        return folder / "mlflow.db"

    db = old_store(tmp_path / "ok")
    before = db.read_bytes()
    tracker = Tracker(db.parent, "old")
    assert tracker.client.get_experiment_by_name("old") is not None
    assert (db.parent / f"mlflow.db.pre-upgrade-{previous}").read_bytes() == before
    with sqlite3.connect(db) as con:
        assert con.execute("select version_num from alembic_version").fetchone()[0] == head

    db = old_store(tmp_path / "dies")
    before = db.read_bytes()

    def dies_half_way(engine):
        with engine.begin() as con:
            con.exec_driver_sql("create table half_migrated (x integer)")
        raise RuntimeError("killed in the middle of a migration")

    monkeypatch.setattr(db_utils, "_upgrade_db", dies_half_way)
    with pytest.raises(StoreError, match="killed in the middle"):
        Tracker(db.parent, "old")
    assert db.read_bytes() == before and sorted(p.name for p in db.parent.iterdir()) == [".tracking.lock", "mlflow.db"]
