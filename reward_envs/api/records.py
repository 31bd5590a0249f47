"""The persisted form of the registry: one ``EnvRecord`` per env in ``registry.json``.

Written atomically (temp file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a crash leaves the old or the new registry, never half of one.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .models import Isolation, Mismatch, Mixture, Status


class EnvRecord(BaseModel):
    """One registered env, as persisted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    status: Status
    source: Literal["path", "inline"]
    path: str
    isolation: Isolation
    requirements: list[str]
    build_hash: str | None = None
    mismatches: list[Mismatch] = []
    error: str | None = None
    mixture: Mixture | None = None
    """Dataset and weight with which a run trains on it (``RegisterRequest.mixture``)."""
    registration: str
    """Id of this registration; a job for a replaced one finds it changed and drops out."""
    created_at: datetime
    updated_at: datetime


class RegistryFile(BaseModel):
    """Contents of ``registry.json``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    envs: list[EnvRecord]


def now() -> datetime:
    return datetime.now(UTC)


def load_records(path: Path) -> list[EnvRecord]:
    """The records in ``path`` (none if it does not exist); ``ValueError`` if it is corrupt."""
    if not path.exists():
        return []
    try:
        return RegistryFile.model_validate_json(path.read_bytes()).envs
    except ValueError as e:
        raise ValueError(f"{path} is not a valid env registry: {e}") from None


def save_records(path: Path, records: list[EnvRecord]) -> None:
    """Replace ``path`` with ``records``, atomically and durably."""
    body = RegistryFile(envs=records).model_dump_json(indent=2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(body + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
