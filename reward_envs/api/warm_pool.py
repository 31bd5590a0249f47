"""One ready env's warm ``EnvPool``: started by the first score call, used under a lock
(a pool supervises its workers from the calling thread and is not thread-safe)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from reward_envs.builder import BuiltEnv
from reward_envs.manifest import Manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult


class PoolClosed(RuntimeError):
    """The env was deleted or replaced while the call waited for its pool."""


class WarmPool:
    """A lazily started pool; ``counters`` hold ``EnvPool.counters()`` after each call."""

    def __init__(self, manifest: Manifest, built: BuiltEnv, workers: int, log_dir: Path) -> None:
        self.manifest, self.built, self.log_dir = manifest, built, log_dir
        self.workers = max(1, min(workers, manifest.concurrency))
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool: EnvPool | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        return self._pool is not None

    def score(self, items: Sequence[Item]) -> list[RewardResult]:
        with self._lock:
            if self._closed:
                raise PoolClosed(
                    f"env {self.manifest.name!r} was deleted or replaced while this call waited"
                )
            if self._pool is None:
                self._pool = EnvPool(self.manifest, self.built, self.workers, log_dir=self.log_dir)
            try:
                return self._pool.score(items)
            finally:
                self.counters = self._pool.counters()

    def close(self) -> None:
        """Kill the workers (waits for a call in progress to finish)."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None
