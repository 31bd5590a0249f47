"""Admission of a registered env: build it, then score its manifest's examples (the canary).

An env is admitted only when every example comes back with exactly its ``expected_score``;
otherwise the mismatches (expected vs got, or the error) say what to fix. After a restart,
``restore`` finds what a ready env was built into again, without rebuilding.
"""

from __future__ import annotations

from pathlib import Path

from reward_envs.builder import BuiltEnv, find_built, prepare, process_env
from reward_envs.config import VenvIsolation
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.pool import EnvPool

from .models import Mismatch


class Gone(RuntimeError):
    """What a ready env ran on no longer exists (or changed); it must be registered again."""


def build(env_dir: Path, isolation: str, venv: VenvIsolation) -> tuple[Manifest, BuiltEnv]:
    """Build (venv: into ``venv.store``, offline from ``venv.wheelhouse`` when set) or locate
    (process) the env; the manifest it runs with."""
    built = prepare(env_dir, venv if isolation == "venv" else isolation, venv.store)
    return load_manifest(Path(built.src)), built


def canary(manifest: Manifest, built: BuiltEnv, log_dir: Path | None = None) -> list[Mismatch]:
    """Score every example through a 1-worker pool; the ones that differ from the manifest.

    Raises ``reward_envs.pool.EnvStartError`` when the env's worker cannot even start.
    """
    items = manifest.example_items()
    pool = EnvPool(manifest, built, workers=1, log_dir=log_dir)
    try:
        results = pool.score(items)
    finally:
        pool.close()
    return [
        Mismatch(
            example=i, expected=e.expected_score, got=r.score, error=_error(r.error_kind, r.error)
        )
        for i, (e, r) in enumerate(zip(manifest.examples, results, strict=True))
        if r.error is not None or r.score != e.expected_score
    ]


def _error(kind: str | None, error: str | None) -> str | None:
    return None if error is None else f"{kind}: {error}"


def restore(
    name: str, env_dir: Path, isolation: str, build_hash: str, store: Path
) -> tuple[Manifest, BuiltEnv]:
    """The manifest and build a ready env had, found again; ``Gone`` says why not."""
    if isolation == "venv":
        entry = store / f"{name}-{build_hash}"
        try:
            built = find_built(entry / "src", store)
        except ValueError as e:  # the entry's source copy is gone or unreadable
            raise Gone(f"its build {entry} is gone ({e}); register the env again") from None
        if built is None or built.build_hash != build_hash:
            raise Gone(f"its build {entry} is gone or stale; register the env again")
    else:
        try:
            built = process_env(env_dir)
        except ValueError as e:
            raise Gone(f"its directory is gone ({e}); register the env again") from None
        if built.build_hash != build_hash:
            raise Gone(
                f"{env_dir} changed since it was admitted (build {build_hash}, now "
                f"{built.build_hash}); register it again to re-run the canary"
            )
    return load_manifest(Path(built.src)), built
