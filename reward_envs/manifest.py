"""The env manifest (``caravela-env.toml``): what an env declares about itself."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from trainer.config import StrictModel


class ExampleItem(StrictModel):
    """An item the env must score as declared (its admission canary)."""

    prompt: str
    """Prompt text."""
    completion: str
    """A completion to score."""
    expected_score: float
    """The score the env must return for it."""
    answer: str | None = None
    """Reference answer field passed to the scorer, when the env takes one."""


class Manifest(StrictModel):
    """Contents of ``caravela-env.toml``."""

    name: str
    """Env name."""
    version: str
    """Env version (part of its build hash)."""
    entry_point: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$")
    """``module:function`` of the scorer, relative to the env directory."""
    isolation: Literal["process", "venv", "docker", "apptainer"] = "venv"
    """Default isolation for this env."""
    requirements: list[str] = Field(default_factory=list)
    """pip requirement specifiers installed into the env's venv."""
    timeout_s: float = Field(10.0, gt=0)
    """Per-item timeout."""
    examples: list[ExampleItem] = Field(default_factory=list)
    """Items with their expected scores."""

    def fields(self, item: ExampleItem) -> dict[str, Any]:
        return {} if item.answer is None else {"answer": item.answer}


def load_manifest(env_dir: Path) -> Manifest:
    path = Path(env_dir) / "caravela-env.toml"
    try:
        return Manifest.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"no env manifest at {path}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ValueError(f"{path}: {e}") from None
