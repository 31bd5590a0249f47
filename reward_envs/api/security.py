"""The server's bearer token: generated per server start, kept in a 0600 file, checked in
constant time."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path


def write_token(path: Path) -> str:
    """A fresh random token written to ``path`` (mode 0600, replaced atomically)."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case a stale temp file had wider permissions
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison (bytes, so non-ASCII input cannot raise)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())
