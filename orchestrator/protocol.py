"""The driver's own typed state: what a checkpoint holds besides the trainer's weights.

``DriverState`` is written as ``driver.json`` in every checkpoint and read back by
``--resume``; nothing untyped goes to disk. ``LiveEnv`` is one env that joined the run
through the env API (``orchestrator.live``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.evaluate import EvalResult


class _Saved(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LiveEnv(_Saved):
    """An env registered through the run's env API that joined the prompt mixture."""

    registration: str
    """The API's registration id (a re-registration under the same name is another env)."""
    path: Path
    """Env directory (holds ``caravela-env.toml``)."""
    isolation: str
    """Isolation type the env was admitted with (``venv``, ``docker``, ...)."""
    dataset: Path
    """Its prompt source."""
    weight: float = Field(gt=0.0)
    """Its sampling weight in the mixture."""


class SamplerState(_Saved):
    """``PromptSampler.state()``: enough to continue the exact same prompt stream."""

    rng: tuple[int, list[int], float | None]
    """``random.Random.getstate()``, JSON-shaped."""
    orders: list[list[int]]
    """Per dataset: the rows of its current epoch not drawn yet."""
    first: list[str]
    """Prompt ids handed out before any new draw."""
    datasets: list[dict[str, Any]]
    """Per dataset: its spec, whether it is sampled now, its row count (a changed file is
    refused on resume), its rows too long for the context (``too_long``)."""


class DriverState(BaseModel):
    """Where the loop stands after a step: the next step, the policy version, the prompt
    stream, the prompts drawn but not trained on, the envs that joined, the "before" eval.
    The loop advances ``step``, ``version`` and ``steps_without_batch`` in place."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    """The next step to run."""
    version: int = Field(ge=0)
    """Policy version the trainer holds (optimizer steps taken)."""
    sampler: SamplerState
    inflight: list[str] = Field(default_factory=list)
    """Prompt ids drawn for a rollout in flight (async): drawn first again on resume."""
    live_envs: dict[str, LiveEnv] = Field(default_factory=dict)
    """Envs that joined through the env API, by name; re-joined before the sampler resumes."""
    before: EvalResult
    """Held-out evaluation before training of the first set (kept for the report)."""
    before_sets: dict[str, EvalResult] = Field(default_factory=dict)
    """The same per ``[[eval.sets]]`` entry, by name."""
    steps_without_batch: int = Field(0, ge=0)
    """Steps so far where no group taught (nothing trained, nothing pushed)."""
