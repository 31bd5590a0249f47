"""Reward-environment configuration: which envs a run scores with, and how they are isolated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from trainer.config import StrictModel

ENV_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class ProcessIsolation(StrictModel):
    """Same Python as Caravela, separate worker process: for trusted built-ins and tests."""

    type: Literal["process"] = "process"
    """Selects this isolation."""


class VenvIsolation(StrictModel):
    """The env's own venv, built with uv into a content-addressed store."""

    type: Literal["venv"] = "venv"
    """Selects this isolation."""
    store: Path | None = None
    """Env store directory (shared filesystem on clusters); None = ``<run dir>/env-store``."""


class DockerIsolation(StrictModel):
    """A long-lived container per worker through any Docker-API engine."""

    type: Literal["docker"] = "docker"
    """Selects this isolation."""
    image: str = Field(min_length=1)
    """Image holding the env's dependencies."""
    mem_limit: str = "1g"
    """Container memory limit (docker syntax)."""


class ApptainerIsolation(StrictModel):
    """Apptainer/Singularity, as HPC sites provide it."""

    type: Literal["apptainer"] = "apptainer"
    """Selects this isolation."""
    image: Path
    """SIF image or sandbox directory."""


Isolation = Annotated[
    ProcessIsolation | VenvIsolation | DockerIsolation | ApptainerIsolation,
    Field(discriminator="type"),
]


class EnvSpec(StrictModel):
    """One verifiable-reward environment used by the run."""

    name: str
    """Env name; prompts whose ``env`` field equals it are scored here."""
    path: Path
    """Env directory holding ``caravela-env.toml`` (relative paths: to the config file)."""
    isolation: Isolation = Field(default_factory=ProcessIsolation)
    """How its worker processes are isolated; pick with ``isolation.type``."""
    workers: int = Field(2, ge=1, le=256)
    """Worker processes in the env's pool."""
    timeout_s: float = Field(10.0, gt=0.0)
    """Hard per-item timeout; the worker is killed past it and the item reported as an error."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ENV_NAME.match(v):
            raise ValueError(
                f"env name {v!r} must be lower-case letters, digits, '-' or '_', starting "
                "with a letter (it becomes a directory and a metric label)"
            )
        return v
