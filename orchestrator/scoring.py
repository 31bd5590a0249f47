"""Score completions with their prompt's env; errors are a result state, never a silent 0.

This is the in-process path used by the single-process run (``isolation.type =
"process"`` executed in the driver). Isolated pools (venv, containers) are the
reward-environment issues' work; asking for them here is a clear error.
"""

from __future__ import annotations

import importlib.util
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reward_envs.config import EnvSpec

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
    manifest_path = spec.path / "caravela-env.toml"
    try:
        manifest = tomllib.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"env {spec.name!r}: no manifest at {manifest_path}") from None
    module_name, _, fn_name = str(manifest.get("entry_point", "")).partition(":")
    file = spec.path / f"{module_name}.py"
    if not fn_name or not file.exists():
        raise ValueError(
            f"env {spec.name!r}: entry_point must be 'module:function' naming a file in "
            f"{spec.path}, got {manifest.get('entry_point')!r}"
        )
    mod_spec = importlib.util.spec_from_file_location(f"caravela_env_{spec.name}", file)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    fn: ScoreFn = getattr(module, fn_name)
    return fn


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
