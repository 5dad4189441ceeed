"""Shared fixtures: tiny random models of every family, built in memory (no network, ever), and a private
PostgreSQL server on 127.0.0.1 for the tests of the cluster setup."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from suite.testing import FAMILY_NAMES, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n 2`, what .ci/run uses) each worker gets one core, its subprocesses too: two workers of two
# threads each on two cores run slower than one process.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str):
    return tiny_model(family)


INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def postgres():
    """A throwaway server (trust auth, loopback only) with databases `mlflow` and `optuna`; its base URL. Its
    folder is directly under /tmp: the postgres user cannot enter pytest's (root-only) temporary folders."""
    pytest.importorskip("psycopg2")
    if not INITDB or shutil.which("runuser") is None:
        pytest.skip("Debian's postgresql is not installed")
    bindir = INITDB[-1].rsplit("/", 1)[0]
    root = Path(tempfile.mkdtemp(prefix="prunebench-pg-"))
    shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def as_postgres(*cmd):
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)

    as_postgres(f"{bindir}/initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
    as_postgres(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start")
    try:
        for db in ("mlflow", "optuna"):
            as_postgres(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        as_postgres(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
