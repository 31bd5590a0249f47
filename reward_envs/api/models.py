"""Request and response bodies of the env API, and the checks a registered manifest must pass.

Request models validate at the edge (422 naming the field); response models say exactly what
a client gets back. Env names follow ``reward_envs.config.ENV_NAME``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

from reward_envs.config import ENV_NAME
from reward_envs.manifest import Manifest

from .inline import MANIFEST_FILE, manifest_toml

MAX_FILES = 64
MAX_ITEMS = 256
MAX_EXAMPLES = 256
MAX_TIMEOUT_S = 3600.0
FILE_NAME = r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,99}/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
"""A plain relative file name, at most one directory deep; no ``..``, no leading ``/``."""
ENV_FILE = re.compile(FILE_NAME)

Status = Literal["building", "ready", "rejected", "failed"]
Isolation = Literal["process", "venv"]
FileName = Annotated[str, StringConstraints(pattern=FILE_NAME)]


def effective_isolation(m: Manifest, requested: Isolation | None) -> Isolation:
    """The isolation an env runs under: the request's override, else its manifest's."""
    chosen = requested or m.isolation
    if chosen == "process" or chosen == "venv":
        return chosen
    raise ValueError(f"isolation {chosen!r} is not served here; use venv or process")


def manifest_problems(m: Manifest) -> list[str]:
    """What keeps a manifest from being registered (empty when it is fine); its isolation is
    checked by ``effective_isolation``, as a request may override it. Its ``requirements``
    were checked when it was read (``Manifest``); its lock file is read on registration
    (``Registry``), against the server's ``RequirementPolicy``."""
    problems = []
    if not ENV_NAME.match(m.name):
        problems.append(
            f"env name {m.name!r} must match {ENV_NAME.pattern} (lower-case letters, digits, "
            "'-' or '_', starting with a letter)"
        )
    if m.lock is not None and not ENV_FILE.match(m.lock):
        problems.append(f"lock {m.lock!r} must be a plain relative file name in the env dir")
    if not m.timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"timeout_s {m.timeout_s} is above {MAX_TIMEOUT_S:g}")
    if len(m.examples) > MAX_EXAMPLES:
        problems.append(f"{len(m.examples)} examples; at most {MAX_EXAMPLES}")
    bad = [i for i, e in enumerate(m.examples) if not math.isfinite(e.expected_score)]
    if bad:
        problems.append(f"examples {bad}: expected_score must be a finite number")
    return problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


_INLINE_EXAMPLE: dict[str, JsonValue] = {
    "manifest": {
        "name": "echo",
        "version": "0.1.0",
        "entry_point": "env:score",
        "isolation": "process",
        "examples": [{"prompt": "p", "completion": "yes", "expected_score": 1.0}],
    },
    "files": {"env.py": "def score(prompt, completion, **fields):\n    return 1.0\n"},
}


DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")


def existing_path(v: str, problem: Callable[[Path], str | None]) -> str:
    """``v`` resolved, when it is an absolute path in which ``problem`` finds nothing wrong
    (``problem`` returns what is wrong, or None); every failure is a ``ValueError``."""
    p = Path(v)
    if "\0" in v or not p.is_absolute():
        raise ValueError("must be an absolute path")
    try:
        wrong = problem(p)
        if wrong is not None:
            raise ValueError(wrong)
        return str(p.resolve(strict=True))
    except (OSError, RuntimeError) as e:  # too long, no permission, a symlink loop
        raise ValueError(f"{v} cannot be read ({e})") from None


class Mixture(_Model):
    """How a registered env joins a running training run's prompt mixture."""

    dataset: str = Field(min_length=1, max_length=4096)
    """Absolute path of the prompts it scores (``.jsonl``, ``.json`` or ``.parquet`` rows
    with ``id``, ``prompt`` and the env's fields) on the filesystem the run reads."""
    weight: float = Field(1.0, gt=0.0, le=1e6)
    """Sampling weight beside the run's other datasets."""

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if Path(v).suffix.lower() not in DATASET_SUFFIXES:
            raise ValueError(f"must end in one of {', '.join(DATASET_SUFFIXES)}")
        return existing_path(v, lambda p: None if p.is_file() else f"{v} is not an existing file")


class RegisterRequest(_Model):
    """Body of ``POST /v1/envs``: an env directory on the shared filesystem, or an inline
    manifest with its files."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"path": "/shared/envs/units"}, _INLINE_EXAMPLE]},
    )

    path: str | None = Field(None, min_length=1, max_length=4096)
    """Absolute path of an existing directory holding ``caravela-env.toml``."""
    manifest: Manifest | None = None
    """The manifest's fields (as in ``caravela-env.toml``), for an inline registration."""
    files: dict[FileName, str] | None = Field(None, max_length=MAX_FILES)
    """Inline registration: file name (plain, relative, one directory at most) -> text."""
    isolation: Isolation | None = None
    """Override the manifest's isolation (``process`` runs in Caravela's own Python)."""
    mixture: Mixture | None = None
    """Train on it: a run with the env API on adds the env and its dataset to the prompt
    mixture at its next step once the env is ``ready``, and drains it when it is deleted.
    Without it the env can only be scored through ``/score``."""

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v

        def problem(p: Path) -> str | None:
            if not p.is_dir():
                return f"{v} is not an existing directory"
            return None if (p / MANIFEST_FILE).is_file() else f"{v} holds no {MANIFEST_FILE}"

        return existing_path(v, problem)

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: Manifest | None) -> Manifest | None:
        if v is None:
            return v
        problems = manifest_problems(v)
        if problems:
            raise ValueError("; ".join(problems))
        manifest_toml(v)  # raises ValueError for what TOML cannot hold (null)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RegisterRequest:
        if (self.path is None) == (self.manifest is None):
            raise ValueError("send exactly one of 'path' or 'manifest' (with 'files')")
        if self.path is not None:
            if self.files is not None:
                raise ValueError("'files' goes with 'manifest', not with 'path'")
            return self
        assert self.manifest is not None
        effective_isolation(self.manifest, self.isolation)
        problems = []
        files = self.files or {}
        if MANIFEST_FILE in files:
            problems.append(f"'files' must not hold {MANIFEST_FILE}: send it as 'manifest'")
        module = self.manifest.entry_point.split(":")[0].replace(".", "/")
        if not {f"{module}.py", f"{module}/__init__.py"} & files.keys():
            problems.append(f"'files' lacks {module}.py, the entry point's module")
        if self.manifest.lock is not None and self.manifest.lock not in files:
            problems.append(f"'files' lacks the lock file {self.manifest.lock!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ScoreItem(_Model):
    """One completion to score."""

    prompt: str
    completion: str
    fields: dict[str, Any] = Field(default_factory=dict)
    """Dataset fields passed to the scorer (e.g. ``answer``)."""

    @field_validator("fields")
    @classmethod
    def _json(cls, v: dict[str, Any]) -> dict[str, Any]:
        json.dumps(v, allow_nan=False)  # ValueError: NaN/inf cannot cross the wire
        return v


class ScoreRequest(_Model):
    """Body of ``POST /v1/envs/{name}/score``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "prompt": "Q: 2+2",
                            "completion": "The answer is 4.",
                            "fields": {"answer": "4"},
                        }
                    ]
                }
            ]
        },
    )

    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_ITEMS)


class Mismatch(_Model):
    """An example the env did not score as its manifest declares."""

    example: int
    expected: float
    got: float | None
    error: str | None = None


class EnvOut(_Model):
    """A registered env."""

    name: str
    version: str
    status: Status
    source: Literal["path", "inline"]
    path: str
    """The env directory (for inline registrations, its copy in the server's state dir)."""
    isolation: Isolation
    requirements: list[str]
    build_hash: str | None
    mismatches: list[Mismatch]
    """Canary examples scored differently than declared (status ``rejected``)."""
    error: str | None
    """Why the env is ``failed`` or ``rejected`` when no mismatch says it."""
    mixture: Mixture | None
    """Its dataset and weight in a running training run's mixture, if it trains."""
    created_at: datetime
    updated_at: datetime


class EnvList(_Model):
    envs: list[EnvOut]
    count: int


class Deleted(_Model):
    name: str
    deleted: bool = True


class ScoreResult(_Model):
    """A score, or an error saying why there is none."""

    score: float | None
    error: str | None
    error_kind: Literal["timeout", "crash", "bad_value", "exception", "protocol"] | None
    worker: str
    """``<worker index>:<pid>`` that produced it."""
    info: dict[str, Any]


class ScoreResponse(_Model):
    env: str
    build_hash: str
    results: list[ScoreResult]


class PoolState(_Model):
    started: bool
    """Whether the warm pool exists (it starts on the first score call)."""
    workers: int
    counters: dict[str, int]
    """``EnvPool.counters()`` as of the last finished score call."""


class EnvHealth(_Model):
    name: str
    status: Status
    pool: PoolState


class ServerHealth(_Model):
    status: Literal["ok"] = "ok"
