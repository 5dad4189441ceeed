"""One exception hierarchy, so the CLI can turn any user-facing failure into one `error:` line."""

from __future__ import annotations

from collections.abc import Iterable


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


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'; did you mean X?' for the closest known names ('' when none is close)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""
