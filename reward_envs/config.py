"""Reward-environment configuration: which envs a run scores with, and how they are isolated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from common.config import StrictModel
from reward_envs.manifest import load_manifest
from reward_envs.requirements import RequirementPolicy

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
    """Env store directory (a shared filesystem on clusters); None = ``$CARAVELA_ENV_STORE``
    or ``~/.cache/caravela/envs``. Pre-build into it with ``caravela env build``."""
    offline: bool = False
    """Build without network access (uv ``--offline``), from the uv cache or ``wheelhouse``."""
    wheelhouse: Path | None = None
    """Directory of wheels to build from with no index (air-gapped nodes); read-only is fine."""
    requirements: RequirementPolicy = Field(default_factory=RequirementPolicy)
    """The index builds install from and what an env's requirement files may name beyond plain
    requirements (index URLs, find-links directories, includes); default: PyPI, nothing."""


class DockerIsolation(StrictModel):
    """A long-lived container per worker through any Docker-API engine."""

    type: Literal["docker"] = "docker"
    """Selects this isolation."""
    image: str = Field(min_length=1)
    """Image holding a ``python3`` and the env's dependencies (the env's source and the
    worker shim are mounted read-only at run time)."""
    mem_limit: str = "1g"
    """Container memory limit (docker syntax)."""
    pids_limit: int = Field(256, ge=8)
    """Most processes in one worker's container."""


class ApptainerIsolation(StrictModel):
    """Apptainer/Singularity, as HPC sites provide it."""

    type: Literal["apptainer"] = "apptainer"
    """Selects this isolation."""
    image: Path
    """SIF image or sandbox directory holding a ``python3`` and the env's dependencies."""
    binary: str = "apptainer"
    """The apptainer (or singularity) executable."""
    extra_args: list[str] = Field(default_factory=list)
    """More ``exec`` options, e.g. ``["--bind", "/scratch/data:/data:ro"]``."""


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
    isolation: Isolation | None = None
    """How its worker processes are isolated; pick with ``isolation.type``. None = what the
    env's manifest says (``isolation`` in its ``caravela-env.toml``, ``venv`` unless it says
    otherwise) with that backend's defaults. ``process`` runs the env in Caravela's own
    Python: only for trusted envs, and only when the config or the manifest asks for it."""
    workers: int = Field(2, ge=1, le=256)
    """Worker processes in the env's pool (capped by the manifest's ``concurrency``)."""
    timeout_s: float | None = Field(None, gt=0.0)
    """Hard per-item timeout; past it the worker is killed and the item is an error.
    None = the manifest's ``timeout_s``."""
    replicas: int = Field(1, ge=1)
    """Pools of this env on the trainer nodes (distributed runs): each in the pool host of
    a trainer node (one host process per node holds every env's pools), spread over the
    nodes in turn."""
    max_restarts: int = Field(5, ge=0)
    """Pools the run may start in place of dead or hung ones, for this env within 10
    minutes (distributed runs; a dead replica's items go to the fresh one or the others; a
    pool host that dies takes every replica on it, of every env, and each counts).
    Reached, the env is quarantined (a crash loop), and with no replica left scoring it
    fails; failures further apart are restarted however many there are in a run."""
    restart_backoff_s: float = Field(0.5, ge=0.0)
    """Wait before starting a pool in place of a dead one; doubles with each restart of
    the env in the last 10 minutes, at most 10 s."""
    hang_timeout_s: float | None = Field(None, gt=0.0)
    """Margin of the deadline a pool replica has to answer a share of items: ``hang_timeout_s
    + 2 x timeout_s x ceil(items / workers)``, plus 150 s for a replica just started. Past
    it its pool host is deemed hung and killed, and the replicas on it replaced. None = 30 s."""
    breaker_window: int = Field(64, ge=1)
    """Circuit breaker: how many of the env's latest item results it looks at."""
    breaker_error_rate: float = Field(0.5, gt=0.0, le=1.0)
    """Circuit breaker: the env is quarantined (the run stops drawing its prompts) when more
    than this fraction of its last ``breaker_window`` results are errors."""
    breaker_min_items: int = Field(32, ge=1)
    """Circuit breaker: results needed before the error rate counts."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ENV_NAME.match(v):
            raise ValueError(
                f"env name {v!r} must be lower-case letters, digits, '-' or '_', starting "
                "with a letter (it becomes a directory and a metric label)"
            )
        return v

    @model_validator(mode="after")
    def _breaker(self) -> EnvSpec:
        if self.breaker_min_items > self.breaker_window:
            raise ValueError(
                f"env {self.name!r}: breaker_min_items ({self.breaker_min_items}) must be at "
                f"most breaker_window ({self.breaker_window}), else the breaker never trips"
            )
        return self

    def resolved_isolation(self) -> Isolation:
        """``isolation`` when the config sets it, else the one the env's manifest names (read
        now, from ``path``)."""
        if self.isolation is not None:
            return self.isolation
        wanted = load_manifest(self.path).isolation
        if wanted == "process":
            return ProcessIsolation()
        if wanted == "venv":
            return VenvIsolation()
        raise ValueError(
            f"env {self.name!r}: its manifest asks for {wanted} isolation, which needs an image; "
            f'set isolation = {{ type = "{wanted}", image = "..." }} in its [[envs]] entry'
        )
