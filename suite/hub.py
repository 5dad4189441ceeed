"""Hugging Face hub access that fails in seconds, with one clear line, when the hub cannot be reached.

huggingface_hub retries an unreachable host for ~45 s per file before giving up; a sweep must not stall on that.
We first look in the local cache, then check that the hub's host accepts a TCP connection before any download.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from suite.errors import ModelLoadError

CONNECT_TIMEOUT_S = 5.0


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_unreachable_reason() -> str | None:
    """None when the hub's host accepts a connection within CONNECT_TIMEOUT_S, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((hub_host(), 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def require_hub(what: str) -> None:
    """Raise ModelLoadError unless the hub is reachable right now (bounded by CONNECT_TIMEOUT_S)."""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub ({hub_host()}) to fetch {what}: {reason}; "
            "use a local directory or a zoo: model"
        )


def is_cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """These environment variables set for the block only, each put back (or removed) after it: libraries such as
    huggingface_hub and datasets read their flags at call time."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Serve from the local cache only: no request at all (transformers still probes optional files otherwise)."""
    import huggingface_hub.constants as constants

    saved_flag, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        with environ(HF_HUB_OFFLINE="1"):
            yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
