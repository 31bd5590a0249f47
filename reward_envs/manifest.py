"""The env manifest (``caravela-env.toml``): what an env declares about itself."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import StrictModel
from reward_envs.protocol import Item
from reward_envs.requirements import parse_requirement


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
    """pip requirement specifiers installed into the env's venv: a name with extras, version
    specifiers, markers and ``--hash`` options; options, URLs and paths are refused
    (``reward_envs.requirements``)."""
    lock: str | None = None
    """A requirements lock file in the env directory (e.g. from ``uv pip compile``); when
    set it is installed instead of ``requirements``. Read with the same rules, line by line,
    when the env is built."""
    timeout_s: float = Field(10.0, gt=0)
    """Hard per-item timeout: past it the worker is killed and the item is an error."""
    concurrency: int = Field(64, ge=1)
    """Most items this env scores at once (caps its workers), e.g. for envs calling a
    rate-limited service."""
    batch_size: int = Field(16, ge=1)
    """Items per call for the batch and trl APIs."""
    required_fields: list[str | list[str]] = Field(default_factory=list)
    """Dataset fields the scorer needs on every item besides the prompt, e.g. ``["answer"]``;
    a list inside names alternatives, one of which suffices (``[["tests", "asserts"]]``). A
    run refuses a dataset of this env lacking one when it loads it, naming the field (a
    ``fields`` mapping in the dataset's ``[[datasets]]`` entry gives other columns these
    names). Empty: nothing is checked."""
    examples: list[ExampleItem] = Field(default_factory=list)
    """Items with their expected scores."""

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, v: list[str]) -> list[str]:
        for i, r in enumerate(v):
            parse_requirement(r, f"requirements[{i}]")  # RequirementError is a ValueError
        return v

    @field_validator("lock")
    @classmethod
    def _lock(cls, v: str | None) -> str | None:
        if v is not None and (
            not v.strip() or "\0" in v or Path(v).is_absolute() or ".." in Path(v).parts
        ):
            raise ValueError(f"lock {v!r} must be a file name relative to the env directory")
        return v

    @model_validator(mode="after")
    def _examples_carry_required_fields(self) -> Manifest:
        if any(not need for need in self.required_fields):
            raise ValueError("required_fields: an entry is empty; give a name or names")
        for i, e in enumerate(self.examples):
            lacking = missing_fields(self.fields(e), self.required_fields)
            if lacking:
                raise ValueError(
                    f"examples[{i}] lacks {lacking[0]}, which required_fields asks of every item"
                )
        return self

    def example_items(self) -> list[Item]:
        """The examples as items to score (the admission canary, ``caravela env test``)."""
        return [Item(e.prompt, e.completion, self.fields(e)) for e in self.examples]

    def fields(self, item: ExampleItem) -> dict[str, Any]:
        extra = dict(item.fields)
        if item.answer is not None:
            extra["answer"] = item.answer
        return extra


def missing_fields(fields: dict[str, Any], required: list[str | list[str]]) -> list[str]:
    """The entries of ``required`` (a manifest's ``required_fields``) that ``fields`` lacks,
    each as text for a message (``'answer'``, ``one of 'tests', 'asserts'``); a null value
    counts as missing."""
    out = []
    for need in required:
        names = [need] if isinstance(need, str) else need
        if all(fields.get(n) is None for n in names):
            quoted = ", ".join(repr(n) for n in names)
            out.append(quoted if len(names) == 1 else f"one of {quoted}")
    return out


def load_manifest(env_dir: Path) -> Manifest:
    path = Path(env_dir) / "caravela-env.toml"
    try:
        return Manifest.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"no env manifest at {path}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ValueError(f"{path}: {e}") from None
