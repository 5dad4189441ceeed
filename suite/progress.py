"""Progress a log file can read. Progress bars are right on a terminal and off elsewhere (tqdm's `disable=None`), so
under nohup, in CI or in a cluster job's log a long command would say nothing until it ends; there these lines
take the bars' place: one per finished unit of work (a grid point, a tuning trial) with its numbers and an ETA, and
a heartbeat during a long one (a prune's step, hard sparsity and loss). They go through the `prunebench.progress`
logger, so `--quiet` silences them and a logging handler can send them to a file."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

PROGRESS = logging.getLogger("prunebench.progress")
HEARTBEAT_SECONDS = 30.0  # PRUNEBENCH_HEARTBEAT_S overrides (0: a line at every step)


def heartbeat_seconds() -> float:
    raw = os.environ.get("PRUNEBENCH_HEARTBEAT_S", "")
    try:
        return max(0.0, float(raw)) if raw else HEARTBEAT_SECONDS
    except ValueError:
        return HEARTBEAT_SECONDS


class Heartbeat:
    """Says `what: <text>` at most every `heartbeat_seconds()` while a long piece of work runs, where no progress
    bar shows (`shown`: whether one does)."""

    def __init__(self, what: str, shown: bool) -> None:
        self.what, self.quiet = what, shown
        self.every = heartbeat_seconds()
        self.last = time.monotonic()

    def beat(self, text: Callable[[], str]) -> None:
        now = time.monotonic()
        if not self.quiet and now - self.last >= self.every:
            self.last = now
            PROGRESS.info("  %s: %s", self.what, text())


class Counter:
    """`[k/n] <text> (eta ...)` for each of `total` units as it finishes, the ETA from the mean time of the units that
    did work (skipped ones are near-instant and would make it too short)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.worked, self.spent = total, 0, 0, 0.0
        self.last = time.monotonic()

    def finished(self, text: str, worked: bool = True) -> None:
        now = time.monotonic()
        self.done += 1
        if worked:
            self.worked += 1
            self.spent += now - self.last
        self.last = now
        left = self.total - self.done
        eta = f" (eta {_duration(left * self.spent / self.worked)})" if left and self.worked else ""
        PROGRESS.info("[%d/%d] %s%s", self.done, self.total, text, eta)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def configure(quiet: bool) -> None:
    """Progress lines on standard error as plain lines (the CLI calls this once; `quiet` turns them off)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    PROGRESS.handlers[:] = [handler]
    PROGRESS.propagate = False
    PROGRESS.setLevel(logging.WARNING if quiet else logging.INFO)
