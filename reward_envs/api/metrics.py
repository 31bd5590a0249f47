"""Prometheus metrics of score calls, per env, in the server's own ``CollectorRegistry``."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from reward_envs.protocol import RewardResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    """Counters for ``/metrics``; only envs that exist get a label (no cardinality blow-up)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "caravela_env_score_requests",
            "Score calls that reached a ready env",
            ["env"],
            registry=self.registry,
        )
        self.items = Counter(
            "caravela_env_items", "Items scored or failed", ["env"], registry=self.registry
        )
        self.errors = Counter(
            "caravela_env_errors",
            "Items that got an error instead of a score, by error kind",
            ["env", "kind"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "caravela_env_timeouts",
            "Items killed past the env's timeout_s",
            ["env"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "caravela_env_score_seconds",
            "Wall time of one score call (all its items)",
            ["env"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, env: str, results: Sequence[RewardResult], seconds: float) -> None:
        self.requests.labels(env).inc()
        self.items.labels(env).inc(len(results))
        self.latency.labels(env).observe(seconds)
        for r in results:
            if r.error_kind is not None:
                self.errors.labels(env, r.error_kind).inc()
                if r.error_kind == "timeout":
                    self.timeouts.labels(env).inc()

    def render(self) -> str:
        """The text exposition format."""
        return generate_latest(self.registry).decode()
