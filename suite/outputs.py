"""Where commands may write: `--out` never destroys anything prunebench did not write.

An output folder (prune, report) is written all-or-nothing (`atomic.replacing_dir`) and carries a marker file
naming its kind. A later command may write into a missing or empty folder, or replace an earlier output of the same
kind (re-running a command needs no flag); anything else is refused before any work, with one line. A folder that
is, or holds, a workdir or a tracking store is always refused: replacing it would delete every recorded run.
Output files (eval --json, bench --out) follow the same rule, with the marker as a top-level JSON key.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from suite.atomic import replacing_dir, write_text
from suite.errors import ConfigError

MARKER = ".prunebench-output"
MARKER_KEY = "prunebench_output"
# what a workdir holds (see runner/tracking/claims): any of these under a folder makes it a workdir
WORKDIR_SIGNS = ("mlflow.db", ".tracking.lock", "claims", "mlartifacts", "mlruns", "optuna.db")
_SQLITE = b"SQLite format 3\x00"


def check_workdir(workdir: Path) -> None:
    """A workdir must be a folder or become one: refuse, with one line, a path that is a file, lies under a file,
    or whose nearest existing folder cannot be written (before anything is created)."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file, not a folder; name a folder with --workdir")
    existing = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(f"workdir {workdir} lies under {existing}, which is a file; name a folder with --workdir")
    if existing != workdir and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} cannot be created: {existing} is not writable")


def _store_inside(folder: Path) -> Path | None:
    """The first workdir sign or sqlite database at or below `folder`, if any."""
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            if name in WORKDIR_SIGNS:
                return Path(root) / name
        for name in files:
            path = Path(root) / name
            if path.suffix in (".db", ".sqlite", ".sqlite3"):
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    if f.read(16) == _SQLITE:
                        return path
    return None


# outputs written before the marker existed, recognised by the files every one of them has
UNMARKED = {"report": ("index.html", "report.json", "results.csv"), "prune": ("metrics.json", "masks.json", "model")}


def _marker_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        pass
    return next((kind for kind, names in UNMARKED.items() if all((folder / n).exists() for n in names)), None)


def check_dir(out: Path, kind: str) -> None:
    """Refuse `out` unless it is missing, empty, or an earlier `kind` output of prunebench (one `error:` line)."""
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out}: the current folder or one above it; choose a new folder (e.g. ./{kind})")
    if not out.exists():
        if out.is_symlink():
            raise ConfigError(f"--out {out}: a broken symbolic link; choose another folder")
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there; choose a new or empty folder")
    store = _store_inside(out)
    if store is not None:
        raise ConfigError(f"--out {out}: refusing to replace a folder that holds a workdir or tracking store "
                          f"({store}); choose a new folder (e.g. {out / kind})")
    if not any(out.iterdir()):
        return
    found = _marker_kind(out)
    if found == kind:
        return
    what = f"a prunebench {found} output" if found else "files prunebench did not write"
    raise ConfigError(f"--out {out}: the folder holds {what}; choose a new or empty folder "
                      f"(only an earlier {kind} output is replaced)")


@contextlib.contextmanager
def output_dir(out: Path, kind: str) -> Iterator[Path]:
    """Check `out`, then yield a temporary folder that replaces it, marked as a `kind` output, when the block ends."""
    check_dir(out, kind)
    with replacing_dir(out) as tmp:
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        yield tmp


def check_file(path: Path, kind: str) -> None:
    """Refuse `path` unless it is missing or an earlier `kind` JSON output of prunebench."""
    if not path.exists():
        return
    if path.is_dir():
        raise ConfigError(f"{path}: a folder is there; give a file name")
    try:
        found = json.loads(path.read_text()).get(MARKER_KEY)
    except (OSError, ValueError, AttributeError):
        found = None
    if found != kind:
        raise ConfigError(f"{path}: the file exists and is not an earlier prunebench {kind} output; "
                          "choose a new file name")


def write_json(path: Path, data: dict[str, Any], kind: str) -> None:
    """Write `data` (marked as a `kind` output) to `path` all-or-nothing, after `check_file`."""
    check_file(path, kind)
    write_text(path, json.dumps({MARKER_KEY: kind} | data, indent=1, sort_keys=True, default=str))
