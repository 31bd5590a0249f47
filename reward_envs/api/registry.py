"""The server's state: registered envs, their admission jobs and their warm pools.

Every change to a record is persisted at once (``records.save_records``). On start the
registry is read back: ``ready`` envs are found again in the build store (``failed`` with a
reason if their build is gone), ``building`` ones are queued again.

Admission (build + canary, ``admission.py``) runs on a small thread pool; a job whose
registration was replaced or deleted meanwhile drops its result. Each ready env gets one
``WarmPool``, started by its first score call.
"""

from __future__ import annotations

import fcntl
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Literal

from reward_envs.builder import BuiltEnv, EnvBuildError, default_store
from reward_envs.config import VenvIsolation
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.pool import EnvStartError
from reward_envs.protocol import Item, RewardResult
from reward_envs.requirements import read_env_requirements

from . import admission
from .inline import write_env
from .metrics import ApiMetrics
from .models import Isolation, Mixture, effective_isolation, manifest_problems
from .records import EnvRecord, load_records, now, save_records
from .settings import ApiSettings
from .warm_pool import WarmPool


class UnknownEnv(KeyError):
    """No env of that name is registered."""


class EnvExists(RuntimeError):
    """An env of that name is registered and the request did not ask to replace it."""


class EnvNotReady(RuntimeError):
    """The env exists but cannot score (still building, rejected, failed or just deleted)."""

    def __init__(self, name: str, status: str) -> None:
        super().__init__(f"env {name!r} is {status}, not ready")
        self.status = status


class Registry:
    """Registered envs and everything running for them; thread-safe."""

    def __init__(self, settings: ApiSettings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.store = settings.store or default_store()
        self.venv = VenvIsolation(
            store=self.store,
            offline=settings.offline,
            wheelhouse=settings.wheelhouse,
            requirements=settings.requirements,
        )
        """How venv-isolated envs are built: into ``store``, offline when configured, from the
        index (or wheelhouse) and with the requirement options the settings allow."""
        self.metrics = metrics
        self._lock = threading.Lock()
        self._records: dict[str, EnvRecord] = {}
        self._ready: dict[str, tuple[Manifest, BuiltEnv]] = {}
        self._pools: dict[str, WarmPool] = {}
        self._jobs = ThreadPoolExecutor(settings.build_workers, thread_name_prefix="env-admit")
        self._closed = False
        self._dir_lock: IO[str] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Take the state dir (one server per dir), reload the registry, re-queue builds."""
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self._dir_lock = open(state / ".lock", "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another env API server is using {state}") from None
        requeue = []
        for rec in load_records(self.settings.registry_file):
            if rec.status == "ready":
                assert rec.build_hash is not None
                try:
                    self._ready[rec.name] = admission.restore(
                        rec.name, Path(rec.path), rec.isolation, rec.build_hash, self.store
                    )
                except admission.Gone as e:
                    rec = rec.model_copy(update={"status": "failed", "error": str(e)})
            elif rec.status == "building":
                requeue.append(rec)
            self._records[rec.name] = rec
        with self._lock:
            self._save()
        for rec in requeue:
            self._jobs.submit(self._admit, rec)

    def close(self) -> None:
        """Stop taking results, cancel queued builds, close every pool, free the state dir."""
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        self._jobs.shutdown(wait=False, cancel_futures=True)
        for p in pools:
            p.close()
        if self._dir_lock is not None:
            self._dir_lock.close()

    # -- queries ----------------------------------------------------------------------------
    def records(self) -> list[EnvRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)

    def get(self, name: str) -> EnvRecord:
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> EnvRecord:
        try:
            return self._records[name]
        except KeyError:
            raise UnknownEnv(name) from None

    def pool_state(self, name: str) -> tuple[EnvRecord, bool, int, dict[str, int]]:
        """The record, whether its pool runs, its worker count and its last counters."""
        with self._lock:
            rec = self._get(name)
            warm = self._pools.get(name)
            ready = self._ready.get(name)
        if warm is not None:
            return rec, warm.started, warm.workers, dict(warm.counters)
        planned = min(self.settings.pool_workers, ready[0].concurrency) if ready else 0
        return rec, False, planned, {}

    # -- changes ----------------------------------------------------------------------------
    def register_path(
        self,
        path: Path,
        isolation: Isolation | None,
        replace: bool,
        mixture: Mixture | None = None,
    ) -> EnvRecord:
        """Register the env directory ``path``; ``ValueError`` when its manifest is unfit."""
        try:
            manifest = load_manifest(path)
        except OSError as e:
            raise ValueError(f"cannot read {path / 'caravela-env.toml'}: {e}") from None
        problems = manifest_problems(manifest)
        try:
            effective_isolation(manifest, isolation)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError(f"{path / 'caravela-env.toml'}: {'; '.join(problems)}")
        try:
            self._check_requirements(path, manifest)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return self._register(manifest, path, "path", isolation, replace, mixture)

    def register_inline(
        self,
        manifest: Manifest,
        files: dict[str, str],
        isolation: Isolation | None,
        replace: bool,
        mixture: Mixture | None = None,
    ) -> EnvRecord:
        """Write the manifest and files into the state dir and register that directory."""
        with self._lock:
            if manifest.name in self._records and not replace:
                raise EnvExists(manifest.name)
        env_dir = write_env(self.settings.inline_dir, manifest, files)
        try:
            self._check_requirements(env_dir, manifest)
            return self._register(manifest, env_dir, "inline", isolation, replace, mixture)
        except (EnvExists, ValueError):
            shutil.rmtree(env_dir, ignore_errors=True)
            raise

    def _check_requirements(self, env_dir: Path, manifest: Manifest) -> None:
        """``RequirementError`` (a ``ValueError``: 422) when the env's requirements, lock file
        or a file it includes names what the settings do not allow; the builder checks again."""
        read_env_requirements(
            env_dir, manifest.requirements, manifest.lock, self.settings.requirements
        )

    def _register(
        self,
        manifest: Manifest,
        env_dir: Path,
        source: Literal["path", "inline"],
        isolation: Isolation | None,
        replace: bool,
        mixture: Mixture | None = None,
    ) -> EnvRecord:
        stamp = now()
        rec = EnvRecord(
            name=manifest.name,
            version=manifest.version,
            status="building",
            source=source,
            path=str(env_dir),
            isolation=effective_isolation(manifest, isolation),
            requirements=manifest.requirements,
            mixture=mixture,
            registration=uuid.uuid4().hex,
            created_at=stamp,
            updated_at=stamp,
        )
        with self._lock:
            old = self._records.get(rec.name)
            if old is not None and not replace:
                raise EnvExists(rec.name)
            self._records[rec.name] = rec
            self._ready.pop(rec.name, None)
            warm = self._pools.pop(rec.name, None)
            self._save()
        self._retire(old, warm)
        self._jobs.submit(self._admit, rec)
        return rec

    def delete(self, name: str) -> None:
        with self._lock:
            rec = self._get(name)
            del self._records[name]
            self._ready.pop(name, None)
            warm = self._pools.pop(name, None)
            self._save()
        self._retire(rec, warm)

    def _retire(self, old: EnvRecord | None, warm: WarmPool | None) -> None:
        if warm is not None:
            warm.close()
        if old is not None and old.source == "inline":
            shutil.rmtree(old.path, ignore_errors=True)

    def score(self, name: str, items: Sequence[Item]) -> tuple[str, list[RewardResult]]:
        """Results from the env's warm pool, and the build hash that produced them."""
        with self._lock:
            rec = self._get(name)
            if rec.status != "ready":
                raise EnvNotReady(name, rec.status)
            warm = self._pools.get(name)
            if warm is None:
                manifest, built = self._ready[name]
                warm = WarmPool(manifest, built, self.settings.pool_workers, self._log_dir)
                self._pools[name] = warm
        t0 = time.perf_counter()
        try:
            results = warm.score(items)
        except EnvStartError as e:
            with self._lock:
                if self._pools.get(name) is warm:
                    del self._pools[name]
                    self._ready.pop(name, None)
            warm.close()
            self._settle(rec, {"status": "failed", "error": f"its workers no longer start: {e}"})
            raise
        self.metrics.observe(name, results, time.perf_counter() - t0)
        return warm.built.build_hash, results

    # -- admission jobs ---------------------------------------------------------------------
    @property
    def _log_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    def _admit(self, rec: EnvRecord) -> None:
        ready: tuple[Manifest, BuiltEnv] | None = None
        try:
            update, ready = self._admission(rec)
        except Exception as e:  # a job has no caller to raise to: the record carries the error
            update = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        self._settle(rec, update, ready)

    def _admission(self, rec: EnvRecord) -> tuple[dict[str, Any], tuple[Manifest, BuiltEnv] | None]:
        if not load_manifest(Path(rec.path)).examples:
            why = "the manifest has no [[examples]]: the admission canary has nothing to check"
            return {"status": "rejected", "error": why}, None
        try:
            manifest, built = admission.build(Path(rec.path), rec.isolation, self.venv)
        except EnvBuildError as e:
            return {"status": "failed", "error": str(e)}, None
        found = {"build_hash": built.build_hash, "version": manifest.version}
        try:
            mismatches = admission.canary(manifest, built, self._log_dir)
        except EnvStartError as e:
            return {**found, "status": "rejected", "error": str(e)}, None
        if mismatches:
            n = len(manifest.examples)
            why = f"{len(mismatches)} of {n} examples scored differently than the manifest declares"
            return {**found, "status": "rejected", "mismatches": mismatches, "error": why}, None
        return {**found, "status": "ready"}, (manifest, built)

    def _settle(
        self,
        rec: EnvRecord,
        update: dict[str, Any],
        ready: tuple[Manifest, BuiltEnv] | None = None,
    ) -> None:
        """Apply a job's outcome, unless the registration it was for is gone."""
        with self._lock:
            current = self._records.get(rec.name)
            if self._closed or current is None or current.registration != rec.registration:
                return
            self._records[rec.name] = current.model_copy(update={**update, "updated_at": now()})
            if ready is not None:
                self._ready[rec.name] = ready
            self._save()

    def _save(self) -> None:
        """Persist every record; call with ``_lock`` held."""
        save_records(self.settings.registry_file, list(self._records.values()))
