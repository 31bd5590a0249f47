"""The circuit breaker of one env (``Breaker``): both scorers (``reward_envs.scorer``) keep
one per env and quarantine the env when it trips."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable

from reward_envs.config import EnvSpec
from reward_envs.protocol import RewardResult

RESTART_WINDOW_S = 600.0
"""Pool restarts this recent count toward quarantine and the restart backoff."""


class Breaker:
    """One env's circuit breaker: its last ``breaker_window`` item results (an item's final
    result, after the pool's own retries) and its pool restarts (replicas started in place of
    lost ones) of the last ten minutes.

    It trips when at least ``breaker_min_items`` results are known and more than
    ``breaker_error_rate`` of them are errors, or when ``max_restarts`` (at least one)
    restarts fall within ``RESTART_WINDOW_S``. Once tripped it stays tripped (``reason``):
    the run stops drawing the env's prompts, so no new result could clear it; removing and
    re-adding the env resets it."""

    def __init__(self, spec: EnvSpec) -> None:
        self.spec = spec
        self.outcomes: deque[str | None] = deque(maxlen=spec.breaker_window)
        """The error kind of each recent result, None for a score."""
        self.restarts: deque[float] = deque()
        """``time.monotonic()`` of each pool restart in the last ten minutes."""
        self.reason: str | None = None
        """Why the env is quarantined (a sentence with the numbers); None while it is not."""

    def record(self, results: Iterable[RewardResult]) -> None:
        self.outcomes.extend(
            (r.error_kind or "error") if r.error is not None else None for r in results
        )
        self._check()

    def restarted(self) -> None:
        self.restarts.append(time.monotonic())
        self._check()

    def recent_restarts(self) -> int:
        """Pool restarts in the last ``RESTART_WINDOW_S``."""
        while self.restarts and time.monotonic() - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        return len(self.restarts)

    def _check(self) -> None:
        if self.reason is not None:
            return
        spec, name = self.spec, repr(self.spec.name)
        kinds = Counter(k for k in self.outcomes if k is not None)
        n, bad = len(self.outcomes), sum(kinds.values())
        if n >= spec.breaker_min_items and bad > spec.breaker_error_rate * n:
            by_kind = ", ".join(f"{k} {v}" for k, v in kinds.most_common())
            self.reason = f"env {name} quarantined: {bad} of its last {n} items errored ({by_kind})"
        elif spec.max_restarts and (recent := self.recent_restarts()) >= spec.max_restarts:
            self.reason = (
                f"env {name} quarantined: its pools were restarted {recent} times in the "
                f"last {RESTART_WINDOW_S / 60:.0f} minutes (EnvSpec.max_restarts = "
                f"{spec.max_restarts}); see its worker logs"
            )
