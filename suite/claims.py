"""Leases on grid points, so that several `prunebench run` processes on one workdir split a sweep between them.

A claim is a file `<workdir>/claims/<identity>.claim` naming its holder (host, pid) and a fresh token; a thread of
the holder touches it every quarter lease. The token fences a holder that lost its claim (paused past its lease,
then taken over): `current()` is false for it, so it records nothing, and `release()` never removes a successor's
claim. A claim is stale when its holder is a dead process on this host, or when nobody touched it
for a whole lease (a holder on another host that died); a stale claim is taken over. Checks and takeovers happen
under one `flock` on the claims folder, so two processes can never both believe they hold a grid point. Workers on
several machines need the workdir on a shared file system (NFS maps `flock` onto its byte-range locks).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from suite.atomic import locked, write_text
from suite.errors import ConfigError, PruneBenchError


class ClaimLost(PruneBenchError):
    """This worker's claim on a grid point was taken over; what it computed is not recorded."""


def lease_seconds() -> float:
    """PRUNEBENCH_LEASE_S (default 120): a positive number of seconds, or one error line."""
    text = os.environ.get("PRUNEBENCH_LEASE_S", "120")
    try:
        lease = float(text)
    except ValueError:
        lease = float("nan")
    if not lease > 0 or lease == float("inf"):
        raise ConfigError(f"PRUNEBENCH_LEASE_S={text!r}: expected a positive number of seconds")
    return lease


class Claims:
    """The claims this process holds on one workdir; `close` (or the context manager) releases them all."""

    def __init__(self, workdir: Path, lease: float | None = None) -> None:
        self.lease = lease if lease is not None else lease_seconds()
        self.dir = workdir / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = self.dir / ".lock"
        self.held: dict[str, tuple[Path, str]] = {}  # identity -> (claim file, our token)
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
        token = secrets.token_hex(8)
        with locked(self.lock):
            if path.exists() and not self._stale(path):
                return False
            # replaces a stale claim in one step
            write_text(path, json.dumps(self.me | {"since": time.time(), "token": token}))
        self.held[identity] = (path, token)
        return True

    def current(self, identity: str) -> bool:
        """Whether this worker still holds `identity` (its token is the one on file)."""
        if identity not in self.held:
            return False
        with locked(self.lock):
            return _ours(*self.held[identity])

    def fence(self, identity: str) -> None:
        """Raise ClaimLost unless this worker still holds `identity`: called before every write of its result."""
        if not self.current(identity):
            raise ClaimLost(f"grid point {identity}: this worker's claim was taken over; its result is not recorded")

    def release(self, identity: str) -> None:
        """Remove our claim; a successor's claim on the same point stays."""
        held = self.held.pop(identity, None)
        if held is not None:
            path, token = held
            with locked(self.lock):
                if _ours(path, token):
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
            for path, token in list(self.held.values()):
                if _ours(path, token):  # never keep a successor's claim alive
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(path)


def _ours(path: Path, token: str) -> bool:
    """Whether the claim file still carries our token (not a successor's, not gone)."""
    return _read(path).get("token") == token


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
