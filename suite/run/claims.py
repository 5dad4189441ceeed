"""Leases on grid points, so that several `prunebench run` processes on one workdir split a sweep between them.

A claim names its holder (host, pid) and carries a fresh token; a thread of the holder renews it every quarter
lease. The token fences a holder that lost its claim (paused past its lease, then taken over): `current()` is false
for it, so it records nothing, and `release()` never removes a successor's claim. A claim is stale when its holder
is a dead process on this host, or when nobody renewed it for a whole lease (a holder on another host that died); a
stale claim is taken over.

Two stores of claims, one interface:
- `FileClaims` (a sqlite tracking store): `<workdir>/claims/<identity>.claim`, checked and taken under one `flock`
  on the claims folder; heartbeats are file mtimes. Workers need a file system where `flock` excludes and file
  times are fresh for everyone: a local one, or NFS with working locks and synchronised clocks.
- `DatabaseClaims` (a database-server tracking store such as PostgreSQL): a `prunebench_claims` table in that
  database, taken and renewed in its transactions (the row, or the unique key, serialises takers) and aged by the
  database server's clock, so workers on several hosts need neither a shared file system nor synchronised clocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from suite.atomic import locked, pid_alive, write_text
from suite.errors import ConfigError, PruneBenchError


class ClaimLost(PruneBenchError):
    """This worker's claim on a grid point was taken over; what it computed is not recorded."""


def _positive_seconds(name: str, default: str) -> float:
    text = os.environ.get(name, default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def lease_seconds() -> float:
    """PRUNEBENCH_LEASE_S (default 120): a positive number of seconds, or one error line."""
    return _positive_seconds("PRUNEBENCH_LEASE_S", "120")


def wait_seconds() -> float:
    """PRUNEBENCH_WAIT_S (default 86400): how long a worker waits for a grid point that a live worker holds before it
    gives up with one line naming the point and its holder (a holder whose heartbeat goes on but whose work hangs)."""
    return _positive_seconds("PRUNEBENCH_WAIT_S", "86400")


class Claims:
    """The claims this process holds; `close` (or the context manager) releases them all. Subclasses say where
    claims live (`_take`, `_token`, `_drop`, `_touch`, `_holder`)."""

    def __init__(self, lease: float | None = None) -> None:
        self.lease = lease if lease is not None else lease_seconds()
        self.held: dict[str, str] = {}  # identity -> our token
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="prunebench-claims", daemon=True)
        self._beat.start()

    @property
    def worker(self) -> str:
        """This process as `host:pid`: who holds a claim, and which worker a run's tag says executed it."""
        return f"{self.me['host']}:{self.me['pid']}"

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def acquire(self, identity: str) -> bool:
        """Claim a grid point; False while another live process holds it."""
        token = secrets.token_hex(8)
        if not self._take(identity, token):
            return False
        self.held[identity] = token
        return True

    def current(self, identity: str) -> bool:
        """Whether this worker still holds `identity` (its token is the one on record)."""
        return identity in self.held and self._token(identity) == self.held[identity]

    def fence(self, identity: str) -> None:
        """Raise ClaimLost unless this worker still holds `identity`: called before every write of its result."""
        if not self.current(identity):
            raise ClaimLost(f"grid point {identity}: this worker's claim was taken over; its result is not recorded")

    def release(self, identity: str) -> None:
        """Remove our claim; a successor's claim on the same point stays."""
        token = self.held.pop(identity, None)
        if token is not None:
            self._drop(identity, token)

    def holder(self, identity: str) -> dict[str, Any] | None:
        """Who holds a grid point now (None: nobody, or a stale holder)."""
        return self._holder(identity)

    def close(self) -> None:
        self._stop.set()
        for identity in list(self.held):
            self.release(identity)

    def _stale(self, info: dict[str, Any], age: float) -> bool:
        """A holder that is a dead process of this host, or one silent for a whole lease."""
        if info.get("host") == self.me["host"] and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
            return True
        return age > self.lease

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            for identity, token in list(self.held.items()):
                with contextlib.suppress(Exception):  # a missed beat is retried; the lease allows three
                    self._touch(identity, token)  # renews only a claim that still carries our token

    def _take(self, identity: str, token: str) -> bool:
        raise NotImplementedError

    def _token(self, identity: str) -> str | None:
        raise NotImplementedError

    def _drop(self, identity: str, token: str) -> None:
        raise NotImplementedError

    def _touch(self, identity: str, token: str) -> None:
        raise NotImplementedError

    def _holder(self, identity: str) -> dict[str, Any] | None:
        raise NotImplementedError


class FileClaims(Claims):
    """Claims as files in `<workdir>/claims`, under one `flock`."""

    def __init__(self, workdir: Path, lease: float | None = None) -> None:
        self.dir = workdir / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = self.dir / ".lock"
        super().__init__(lease)

    def _path(self, identity: str) -> Path:
        return self.dir / f"{identity}.claim"

    def _take(self, identity: str, token: str) -> bool:
        path = self._path(identity)
        with locked(self.lock):
            if self._live(path) is not None:
                return False
            write_text(path, json.dumps(self.me | {"since": time.time(), "token": token}))  # replaces a stale one
        return True

    def _token(self, identity: str) -> str | None:
        with locked(self.lock):
            return _read(self._path(identity)).get("token")

    def _drop(self, identity: str, token: str) -> None:
        with locked(self.lock):
            if _read(self._path(identity)).get("token") == token:
                self._path(identity).unlink(missing_ok=True)

    def _touch(self, identity: str, token: str) -> None:
        if _read(self._path(identity)).get("token") == token:  # never keep a successor's claim alive
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._path(identity))

    def _holder(self, identity: str) -> dict[str, Any] | None:
        with locked(self.lock):
            return self._live(self._path(identity))

    def _live(self, path: Path) -> dict[str, Any] | None:
        """The claim at `path` when it is live (the caller holds the lock). Its time is read from the open file
        (`fstat`): on NFS an `open` revalidates the file's attributes where a bare `stat` may answer from a cache."""
        try:
            with open(path) as f:
                age = time.time() - os.fstat(f.fileno()).st_mtime
                info = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info, age = {}, float("inf")  # unreadable: nobody's claim
        return None if self._stale(info, age) else info


class DatabaseClaims(Claims):
    """Claims as rows of `prunebench_claims` in the tracking database, aged by the database server's clock."""

    def __init__(self, uri: str, lease: float | None = None) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(uri, pool_pre_ping=True)
        meta = sa.MetaData()
        self.table = sa.Table(
            "prunebench_claims", meta,
            sa.Column("identity", sa.String(64), primary_key=True),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("token", sa.String(32), nullable=False),
            sa.Column("since", sa.DateTime(timezone=True), nullable=False),
            sa.Column("beat", sa.DateTime(timezone=True), nullable=False),
        )
        with contextlib.suppress(sa.exc.IntegrityError, sa.exc.ProgrammingError):  # workers racing to create it
            meta.create_all(self.engine)
        super().__init__(lease)

    @contextlib.contextmanager
    def _row(self, identity: str) -> Iterator[tuple[Any, dict[str, Any] | None, float]]:
        """A transaction holding the claim row of `identity` locked (FOR UPDATE), that row (or None) and its age by
        the server's clock."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as con:
            now = con.execute(sa.select(sa.func.now())).scalar_one()
            row = con.execute(sa.select(t).where(t.c.identity == identity).with_for_update()).mappings().first()
            age = 0.0 if row is None else (_naive(now) - _naive(row["beat"])).total_seconds()
            yield con, None if row is None else dict(row), age

    def _take(self, identity: str, token: str) -> bool:
        import sqlalchemy as sa

        t = self.table
        try:
            with self._row(identity) as (con, row, age):
                values = {**self.me, "token": token, "since": sa.func.now(), "beat": sa.func.now()}
                if row is None:
                    con.execute(t.insert().values(identity=identity, **values))
                elif self._stale(row, age):
                    con.execute(t.update().where(t.c.identity == identity).values(**values))
                else:
                    return False
        except sa.exc.IntegrityError:  # another worker inserted the same point at the same moment
            return False
        return True

    def _token(self, identity: str) -> str | None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.connect() as con:
            return con.execute(sa.select(t.c.token).where(t.c.identity == identity)).scalar()

    def _drop(self, identity: str, token: str) -> None:
        t = self.table
        with self.engine.begin() as con:
            con.execute(t.delete().where((t.c.identity == identity) & (t.c.token == token)))

    def _touch(self, identity: str, token: str) -> None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as con:
            con.execute(t.update().where((t.c.identity == identity) & (t.c.token == token)).values(beat=sa.func.now()))

    def _holder(self, identity: str) -> dict[str, Any] | None:
        with self._row(identity) as (_, row, age):
            return None if row is None or self._stale(row, age) else row

    def close(self) -> None:
        super().close()
        self.engine.dispose()


def open_claims(workdir: Path, tracking_uri: str) -> Claims:
    """The claims for a sweep recording into `tracking_uri`: in that database for a database server, else files in
    the workdir."""
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        return FileClaims(workdir)
    return DatabaseClaims(tracking_uri)


def _naive(moment: Any) -> Any:
    """Database timestamps compared without their zone (both come from the same server clock)."""
    return moment.replace(tzinfo=None) if getattr(moment, "tzinfo", None) is not None else moment


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
