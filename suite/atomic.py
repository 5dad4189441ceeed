"""Writes that are all-or-nothing: a killed process leaves the previous complete file or folder, never half a new one.

They write beside the target (same file system) and `rename` into place, which POSIX makes atomic. `locked` is the
inter-process lock that read-modify-write sequences on shared files take."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from suite.errors import ConfigError


def within(root: Path, *parts: str) -> Path:
    """`root / parts`, refused with one line unless it resolves inside `root`: every path made from a config value
    (experiment names, labels, model slugs) stays in the workdir, whatever the value's validation let through."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{'/'.join(parts)!r} would write outside {root}; names in a config are plain names")
    return path


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write; when the block ends without an error it replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block; released when the holder dies too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; when the block ends without an error it takes `path`'s place,
    otherwise it is deleted and `path` stays as it was. The swap is one `renameat2(RENAME_EXCHANGE)` where the
    system has it (Linux), so a kill at any moment leaves the old or the new folder at `path`, never nothing; the
    folders a killed writer left beside it are cleared (or, after a kill inside the two-rename fallback, the old
    folder is put back) by the next writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system cannot (no renameat2, or a file system without it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _recover(path: Path) -> None:
    """Clear what killed writers of `path` left beside it: their half-written `.tmp` folders, and an `.old` folder
    that a kill between the fallback's two renames left instead of `path` (put back first)."""
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.old")):
        if _dead(leftover):
            if path.exists():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.rename(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _dead(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _dead(leftover: Path) -> bool:
    """Whether the process named in a leftover's `.<name>.<pid>.<kind>` is gone from this host."""
    try:
        pid = int(leftover.name.rsplit(".", 2)[1])
    except (IndexError, ValueError):
        return False
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (someone else's process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
