"""One hashing helper: every content hash, identity and fingerprint in prunebench is a truncated sha256."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(*parts: bytes | str, length: int = 16) -> str:
    """sha256 of the parts in order (text as UTF-8), as `length` hex characters."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def json_digest(body: Any, length: int = 20) -> str:
    """The digest of a JSON-able body, key order and non-JSON values (paths, enums) made canonical."""
    return digest(json.dumps(body, sort_keys=True, default=str), length=length)
