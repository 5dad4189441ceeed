"""The prunebench command line, and the Python API (`prunebench.prune`, `prunebench.evaluate`): the one place that
composes suite (pruning, evaluation, orchestration) with reports, so neither imports the other."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """`prune` and `evaluate` load torch and the methods on first use, so `prunebench --help` stays quick."""
    if name in ("prune", "evaluate"):
        from prunebench import api

        return getattr(api, name)
    raise AttributeError(f"module 'prunebench' has no attribute {name!r}")
