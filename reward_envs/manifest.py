"""The env manifest (``caravela-env.toml``): what an env declares about itself."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from common.config import StrictModel
from reward_envs.protocol import Item


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
    fields: dict[str, Any] = Field(default_factory=dict)
    """Other dataset fields passed to the scorer."""


class Manifest(StrictModel):
    """Contents of ``caravela-env.toml``."""

    name: str
    """Env name."""
    version: str
    """Env version (part of its build hash)."""
    entry_point: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
    """``module:function`` of the scorer, importable from the env directory."""
    api: Literal["score", "batch", "trl"] = "score"
    """How the entry point is called: ``score(prompt, completion, **fields)`` per item;
    ``batch(items: list[dict])`` returning one result per item; or a TRL reward function
    ``fn(prompts, completions, **columns) -> list[float]``, used as-is."""
    isolation: Literal["process", "venv", "docker", "apptainer"] = "venv"
    """How the env runs when a run config's ``[[envs]]`` entry names no isolation
    (``EnvSpec.resolved_isolation``): ``venv``, its own venv; ``process``, Caravela's own
    Python (trusted envs only); ``docker`` or ``apptainer``, for which that entry must give
    the image."""
    requirements: list[str] = Field(default_factory=list)
    """pip requirement specifiers installed into the env's venv."""
    lock: str | None = None
    """A requirements lock file in the env directory (e.g. from ``uv pip compile``); when
    set it is installed instead of ``requirements``."""
    timeout_s: float = Field(10.0, gt=0)
    """Hard per-item timeout: past it the worker is killed and the item is an error."""
    concurrency: int = Field(64, ge=1)
    """Most items this env scores at once (caps its workers), e.g. for envs calling a
    rate-limited service."""
    batch_size: int = Field(16, ge=1)
    """Items per call for the batch and trl APIs."""
    examples: list[ExampleItem] = Field(default_factory=list)
    """Items with their expected scores."""

    def example_items(self) -> list[Item]:
        """The examples as items to score (the admission canary, ``caravela env test``)."""
        return [Item(e.prompt, e.completion, self.fields(e)) for e in self.examples]

    def fields(self, item: ExampleItem) -> dict[str, Any]:
        extra = dict(item.fields)
        if item.answer is not None:
            extra["answer"] = item.answer
        return extra


def load_manifest(env_dir: Path) -> Manifest:
    path = Path(env_dir) / "caravela-env.toml"
    try:
        return Manifest.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"no env manifest at {path}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ValueError(f"{path}: {e}") from None
