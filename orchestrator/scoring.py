"""Score completions with their prompt's env; errors are a result state, never a silent 0.

This is the in-process path used by the single-process run (``isolation.type =
"process"`` executed in the driver). Isolated pools (venv, containers) are the
reward-environment issues' work; asking for them here is a clear error.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_envs.config import EnvSpec
from reward_envs.manifest import Manifest, load_manifest

ScoreFn = Callable[..., Any]


@dataclass(frozen=True)
class Score:
    """A reward, or the reason there is none."""

    value: float | None
    error: str | None = None


def load_env(spec: EnvSpec) -> ScoreFn:
    """Import the env's entry point (``module:function`` from ``caravela-env.toml``)."""
    if spec.isolation.type != "process":
        raise NotImplementedError(
            f"env {spec.name!r}: isolation {spec.isolation.type!r} needs the supervised env "
            'pools, not built yet; set isolation.type = "process" for now'
        )
    return import_entry_point(spec.path, load_manifest(spec.path))


def import_entry_point(env_dir: Path, manifest: Manifest) -> ScoreFn:
    """The scorer a manifest's ``entry_point`` (``module:function``) names, imported in-process."""
    module_name, _, fn_name = manifest.entry_point.partition(":")
    file = env_dir / f"{module_name}.py"
    if not file.exists():
        raise ValueError(
            f"env {manifest.name!r}: entry_point {manifest.entry_point!r} names {file}, "
            "which does not exist"
        )
    mod_spec = importlib.util.spec_from_file_location(f"caravela_env_{manifest.name}", file)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(
            f"env {manifest.name!r}: {file} defines no function {fn_name!r} (entry_point "
            f"{manifest.entry_point!r})"
        )
    scorer: ScoreFn = fn
    return scorer


def score_one(fn: ScoreFn, prompt: str, completion: str, fields: dict[str, Any]) -> Score:
    """Run a scorer on one completion and validate what it returned."""
    try:
        value = fn(prompt, completion, **fields)
    except Exception as e:  # noqa: BLE001 - any env bug becomes an error result, not a crash
        return Score(None, f"{type(e).__name__}: {e}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Score(None, f"bad return value {value!r}: a score must be a float")
    if not math.isfinite(value):
        return Score(None, f"bad return value {value!r}: a score must be finite")
    return Score(float(value))
