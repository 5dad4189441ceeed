"""Leases on grid points, so that several `prunebench run` processes on one workdir split a sweep between them.

A claim is a file `<workdir>/claims/<identity>.claim` naming its holder (host, pid); a thread of the holder touches
it every quarter lease. A claim is stale when its holder is a dead process on this host, or when nobody touched it
for a whole lease (a holder on another host that died); a stale claim is taken over. Checks and takeovers happen
under one `flock` on the claims folder, so two processes can never both believe they hold a grid point. Workers on
several machines need the workdir on a shared file system (NFS maps `flock` onto its byte-range locks).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from suite.atomic import locked, write_text

LEASE_SECONDS = float(os.environ.get("PRUNEBENCH_LEASE_S", "120"))


class Claims:
    """The claims this process holds on one workdir; `close` (or the context manager) releases them all."""

    def __init__(self, workdir: Path, lease: float = LEASE_SECONDS) -> None:
        self.dir = workdir / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = self.dir / ".lock"
        self.lease = lease
        self.held: dict[str, Path] = {}
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="prunebench-claims", daemon=True)
        self._beat.start()

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def acquire(self, identity: str) -> bool:
        """Claim a grid point; False while another live process holds it."""
        path = self.dir / f"{identity}.claim"
        with locked(self.lock):
            if path.exists() and not self._stale(path):
                return False
            write_text(path, json.dumps(self.me | {"since": time.time()}))  # replaces a stale claim in one step
        self.held[identity] = path
        return True

    def release(self, identity: str) -> None:
        path = self.held.pop(identity, None)
        if path is not None:
            with locked(self.lock):
                path.unlink(missing_ok=True)

    def holder(self, identity: str) -> dict[str, object] | None:
        """Who holds a grid point now (None: nobody, or a stale holder)."""
        path = self.dir / f"{identity}.claim"
        with locked(self.lock):
            if not path.exists() or self._stale(path):
                return None
            return _read(path)

    def close(self) -> None:
        self._stop.set()
        for identity in list(self.held):
            self.release(identity)

    def _stale(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        info = _read(path)
        if info.get("host") == self.me["host"] and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
            return True
        return age > self.lease

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            for path in list(self.held.values()):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)


def _read(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
