"""One exception hierarchy, so the CLI can turn any user-facing failure into one `error:` line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class PruneBenchError(Exception):
    """Base of every error a user can act on; the CLI prints it as `error: <message>` and exits 2."""


class ConfigError(PruneBenchError):
    """A setting, override or target is invalid."""


class UnsupportedModel(PruneBenchError):
    """The model's family or shape is outside what the structure adapters understand."""


class MaskMismatch(PruneBenchError):
    """Masks were made for a different structure than the one they are applied to."""


class TargetUnreachable(PruneBenchError):
    """The requested sparsity cannot be met under the given constraints."""


class UnknownMethod(PruneBenchError):
    """No pruning method is registered under the requested name."""


class ModelLoadError(PruneBenchError):
    """A model spec could not be resolved or loaded (missing directory, unreachable hub, bad checkpoint)."""


class DataError(PruneBenchError):
    """A text source, data set or calibration spec cannot be resolved."""


class NumericalError(PruneBenchError):
    """Training diverged: a loss became NaN or infinite (mask learning, recovery)."""


class StoreError(PruneBenchError):
    """The tracking or artifact store refused a write (full disk, permissions, a file where a folder should be)."""


class DiskFull(StoreError):
    """A write failed for lack of space (ENOSPC, EFBIG: a file-size limit, SQLite's "database or disk is full")."""


NO_SPACE_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG, EDQUOT
NO_SPACE_WORDS = ("database or disk is full", "no space left on device", "file too large", "disk quota exceeded")


def no_space(err: BaseException | None) -> BaseException | None:
    """The exception in `err`'s chain (its cause and context, as MLflow and SQLAlchemy wrap them) that says a write
    ran out of space, or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFull) or (isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS):
            return err
        if any(word in str(err).lower() for word in NO_SPACE_WORDS):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full(err: BaseException, where: Path) -> DiskFull:
    """The one line for a write that ran out of space: the path it was writing (the OSError's, else `where`: the
    store) and the free space on that file system."""
    import shutil

    found = no_space(err) or err
    if isinstance(found, DiskFull):
        return found
    path = Path(found.filename) if isinstance(found, OSError) and found.filename else Path(where)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    cause = (str(found).strip().splitlines() or [type(found).__name__])[0]
    return DiskFull(f"no space to write {path} ({free / 2**20:.0f} MiB free on its file system; {cause[:200]}): "
                    "the run in progress is marked FAILED and the sweep stopped; free some space and run again "
                    "to resume")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'; did you mean X?' for the closest known names ('' when none is close)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""
