"""Route items to the pool of the env they belong to: in this process, or on Ray pool hosts.

Both scorers answer ``score(env, items) -> list[RewardResult]``, one result per
item in order. ``LocalScorer`` runs one ``EnvPool`` per env in the caller's
process (single-node runs, the CLI). ``RayScorer`` runs ``replicas`` pools per env
on the trainer nodes (``trainer_node`` resource): one ``PoolHost`` actor per trainer
node holds the pools of every env placed there (``hosts.py``), an env's replicas
spread over the nodes in turn; items are split across an env's replicas. A replica
whose host dies, or hangs past its deadline (``RayScorer.deadline_s``) and is
killed, or whose pool does not start, is replaced by a fresh pool (at most
``EnvSpec.max_restarts`` times per env, after a backoff), on a fresh host where
its host is gone, and its share is re-sent, so every item gets exactly one result.
A host's death takes every replica on it, of every env: each env replaces its own
on its next ``score`` (in-flight shares are re-sent at once). Only an env with no
replica left and no restart left fails ``score``.

Both scorers keep a circuit breaker per env (``Breaker``): too many errors among
its latest results, or too many pool restarts in ten minutes, quarantine the
env (``quarantined()``); its items are still scored when asked, the caller stops
drawing its prompts. ``metrics()`` is what a run can log per step: the pools'
counters (restarts, errors by kind), replicas alive, lost and restarted, items
re-sent, quarantined envs.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_envs.breaker import RESTART_WINDOW_S, Breaker
from reward_envs.builder import BuiltEnv, prepare
from reward_envs.config import EnvSpec
from reward_envs.hosts import TRAINER_RESOURCE, Hosts, Replica
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.pool import EnvPool, EnvStartError
from reward_envs.protocol import Item, RewardResult

MAX_BACKOFF_S = 10.0
"""Longest wait before a pool restart."""
HANG_MARGIN_S = 30.0
"""Deadline margin when ``EnvSpec.hang_timeout_s`` is None."""
STARTUP_S = 150.0
"""Extra deadline of a replica that has not answered yet: its workers get 120 s to say
hello (``EnvPool``), and Ray some time to place a fresh host."""


def pool_metrics(env: str, counters: Iterable[dict[str, int]]) -> dict[str, float]:
    """The pools' ``counters()`` summed, as run totals: ``envs/<env>/items``, ``scored``,
    ``restarts`` (workers restarted after a crash or timeout), ``errors`` and
    ``errors/<kind>``."""
    total: Counter[str] = Counter(dict.fromkeys(("items", "scored", "restarts", "errors"), 0))
    for c in counters:
        total.update(c)
    return {f"envs/{env}/{k}": float(v) for k, v in sorted(total.items())}


def prepare_spec(spec: EnvSpec) -> tuple[Manifest, BuiltEnv]:
    """The env's manifest and its build (found in the store or built now), under the isolation
    the config sets, else the manifest's."""
    return load_manifest(spec.path), prepare(spec.path, spec.resolved_isolation())


class _Health:
    """What both scorers share: a breaker per env, and the run totals of ``metrics()``."""

    def __init__(self) -> None:
        self.breakers: dict[str, Breaker] = {}
        self._removed_worker_restarts = 0.0
        """Worker restarts of the pools of envs removed during the run (run totals)."""

    def quarantined(self) -> dict[str, str]:
        """Env -> why it is quarantined (see ``Breaker``), for each quarantined env. The
        caller stops drawing its prompts; its items are still scored when asked."""
        return {env: b.reason for env, b in self.breakers.items() if b.reason is not None}

    def _totals(
        self, per_env: dict[str, float], pool_restarts: int, rescored: int
    ) -> dict[str, float]:
        """``per_env`` (``pool_metrics`` of every env) plus ``envs/<env>/quarantined`` and
        the run totals ``restarts/pool``, ``restarts/worker``, ``items_rescored`` and
        ``envs_quarantined``."""
        out = dict(per_env)
        for env, b in self.breakers.items():
            out[f"envs/{env}/quarantined"] = float(b.reason is not None)
        out["restarts/pool"] = float(pool_restarts)
        out["restarts/worker"] = self._removed_worker_restarts + sum(
            per_env.get(f"envs/{env}/restarts", 0.0) for env in self.breakers
        )
        out["items_rescored"] = float(rescored)
        out["envs_quarantined"] = float(len(self.quarantined()))
        return out


class LocalScorer(_Health):
    """One pool per env in this process."""

    def __init__(self, specs: Sequence[EnvSpec], log_dir: Path | None = None) -> None:
        super().__init__()
        self.pools: dict[str, EnvPool] = {}
        self.log_dir = log_dir
        try:
            for spec in specs:
                self.add(spec)
        except BaseException:
            self.close()
            raise

    def add(self, spec: EnvSpec) -> None:
        """Start a pool for a new env (an env registered during a run joins this way)."""
        if spec.name in self.pools:
            raise ValueError(f"env {spec.name!r} is already scored by this run")
        manifest, built = prepare_spec(spec)
        self.pools[spec.name] = EnvPool(
            manifest, built, spec.workers, spec.timeout_s, log_dir=self.log_dir
        )
        self.breakers[spec.name] = Breaker(spec)

    def remove(self, env: str) -> None:
        """Stop an env's pool (nothing of it may be in flight: the run drains it first)."""
        pool = self.pools.pop(env)
        self._removed_worker_restarts += pool.stats["restarts"]
        del self.breakers[env]
        pool.close()

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]:
        if env not in self.pools:
            raise KeyError(f"no env named {env!r}; this run has {sorted(self.pools)}")
        results = self.pools[env].score(items)
        self.breakers[env].record(results)
        return results

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: p.counters() for name, p in self.pools.items()}

    def metrics(self) -> dict[str, float]:
        """Each pool's counters as step metrics (``pool_metrics``), ``envs/<env>/quarantined``
        and the run totals ``restarts/worker`` and ``envs_quarantined``; ``restarts/pool`` and
        ``items_rescored`` are 0 (no actors here)."""
        out: dict[str, float] = {}
        for name, p in self.pools.items():
            out.update(pool_metrics(name, [p.counters()]))
        return self._totals(out, pool_restarts=0, rescored=0)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()


@dataclass
class _Env:
    """What ``RayScorer`` needs to start one more pool of an env."""

    spec: EnvSpec
    manifest: Manifest
    built: BuiltEnv
    last_failure: str = ""
    """How the last replica that was lost failed (for the error when none is left)."""

    @property
    def workers(self) -> int:
        return max(1, min(self.spec.workers, self.manifest.concurrency))

    @property
    def timeout_s(self) -> float:
        return self.spec.timeout_s or self.manifest.timeout_s


class RayScorer(_Health):
    """``replicas`` pools per env on the trainer nodes' pool hosts, replaced when they die or
    hang."""

    def __init__(self, specs: Sequence[EnvSpec], log_dir: Path | None = None) -> None:
        import ray

        if not ray.cluster_resources().get(TRAINER_RESOURCE):
            raise RuntimeError(
                f"no Ray node offers the {TRAINER_RESOURCE!r} resource, so env pools have "
                f"nowhere to run; start trainer nodes with `ray start ... --resources "
                f"'{{\"{TRAINER_RESOURCE}\": 1}}'` (the SLURM launcher does)"
            )
        super().__init__()
        self.hosts = Hosts()
        self.replicas: dict[str, list[Replica]] = {}
        """Env -> its replicas in service (one on a host found dead stays listed, not alive,
        until the env's next ``score`` replaces it)."""
        self.log_dir = log_dir
        self.lost: Counter[str] = Counter()
        """Replicas of each env that died or hung (their items went to the others)."""
        self.resent: Counter[str] = Counter()
        """Items of each env re-sent to another replica because theirs died or hung."""
        self.restarted: Counter[str] = Counter()
        """Pools of each env started in place of lost ones (run totals; at most
        ``max_restarts`` within ``RESTART_WINDOW_S``)."""
        self._envs: dict[str, _Env] = {}
        self._counters: dict[str, dict[Replica, dict[str, int]]] = {}
        """env -> replica -> its pool's counters as of its last answer (kept after it dies,
        so totals never go down)."""
        try:
            self._add_all(specs)
        except BaseException:
            self.close()
            raise

    def add(self, spec: EnvSpec) -> None:
        """Start ``spec.replicas`` pools for a new env and wait until they run (an env
        registered during a run joins this way)."""
        self._add_all([spec])

    def _add_all(self, specs: Sequence[EnvSpec]) -> None:
        """Start the pools of every env in ``specs`` at once, then wait until they all run:
        hosts and env workers start concurrently, not env after env. If one fails, the others
        are stopped and its error raised (``EnvStartError`` names the env)."""
        import ray

        starting: list[tuple[_Env, list[Replica]]] = []
        try:
            for spec in specs:
                if spec.name in self.replicas or any(e.spec.name == spec.name for e, _ in starting):
                    raise ValueError(f"env {spec.name!r} is already scored by this run")
                manifest, built = prepare_spec(spec)  # built on the driver, into the shared store
                env = _Env(spec, manifest, built)
                starting.append((env, [self._place(env) for _ in range(spec.replicas)]))
            ray.get([r.started for _, rs in starting for r in rs])
        except BaseException:
            self._close([r for _, rs in starting for r in rs])
            raise
        for env, rs in starting:
            for r in rs:
                r.started = None
            name = env.spec.name
            self._envs[name] = env
            self.replicas[name] = rs
            self._counters[name] = {}
            self.breakers[name] = Breaker(env.spec)

    def _place(self, env: _Env, node: str | None = None) -> Replica:
        spec = env.spec
        return self.hosts.place(
            spec.name, env.manifest, env.built, spec.workers, spec.timeout_s, self.log_dir, node
        )

    def remove(self, env: str) -> None:
        """Stop an env's pools (nothing of it may be in flight: the run drains it first); its
        counters are dropped with it (its worker restarts stay in the run totals). The hosts
        stay for the other envs."""
        self._close(self.replicas.pop(env))
        self._removed_worker_restarts += sum(
            c.get("restarts", 0) for c in self._counters.pop(env, {}).values()
        )
        self._envs.pop(env, None)
        self.breakers.pop(env, None)

    def deadline_s(self, env: str, replica: Replica, n: int) -> float:
        """Seconds ``replica`` of ``env`` gets to answer a share of ``n`` items before its host
        is deemed hung: ``hang_timeout_s`` (None: ``HANG_MARGIN_S``) + 2 x ``timeout_s`` x
        ceil(n / workers), plus ``STARTUP_S`` for a replica that has not answered yet. Each
        worker scores ceil(n / workers) items one after the other, each within ``timeout_s``
        or killed; the factor 2 covers the pool's own retries (a crashed item is retried
        once, a timed-out batch item by item) and worker restarts, the margin Ray's round
        trip and a busy node."""
        e = self._envs[env]
        margin = e.spec.hang_timeout_s if e.spec.hang_timeout_s is not None else HANG_MARGIN_S
        work = 2 * e.timeout_s * math.ceil(n / e.workers)
        return margin + work + (STARTUP_S if replica.started is not None else 0.0)

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]:
        """One result per item, in order. Items are split over the env's idle replicas; the
        share of a replica whose host dies, or misses its deadline (``deadline_s``) and is
        killed, is re-sent to the fresh replica started in its place or to the others, so
        each item is scored exactly once. Raises only when no replica and no restart is
        left."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if env not in self.replicas:
            raise KeyError(f"no env named {env!r}; this run has {sorted(self.replicas)}")
        results: dict[int, RewardResult] = {}
        todo = list(range(len(items)))
        # ref -> (replica, its share, deadline); one share in flight per replica
        pending: dict[Any, tuple[Replica, list[int], float]] = {}
        while todo or pending:
            busy = {r for r, _, _ in pending.values()}
            for r in [r for r in self.replicas[env] if not r.alive and r not in busy]:
                self._replace(env, r, r.host.dead)  # its host died during another env's call
            idle = [r for r in self.replicas[env] if r not in busy]
            if todo and idle:
                now = time.monotonic()
                for i, r in enumerate(idle):
                    share = todo[i :: len(idle)]
                    if share:
                        batch = [items[j] for j in share]
                        ref = r.host.actor.score_counted.remote(r.key, batch, r.started)
                        pending[ref] = (r, share, now + self.deadline_s(env, r, len(share)))
                todo = []
            elif todo and not pending:
                raise RuntimeError(self._exhausted(env, len(todo)))
            wait = min(d for _, _, d in pending.values()) - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait))
            for ref in ready:
                r, share, _ = pending.pop(ref)
                try:
                    scored, counters = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError) as e:
                    self.hosts.lost(r.host, f"{type(e).__name__}: {e}")
                    failure = f"{type(e).__name__}: {e}"
                except EnvStartError as e:
                    if r.started is None:  # a running pool could not restart a worker
                        raise
                    failure = f"{type(e).__name__}: {e}"  # a fresh pool could not start
                else:
                    r.started = None
                    results.update(zip(share, scored, strict=True))
                    self._counters[env][r] = counters
                    continue
                self._replace(env, r, failure)
                self.resent[env] += len(share)
                todo += share
            now = time.monotonic()
            for ref, (r, share, deadline) in list(pending.items()):
                if now > deadline:
                    del pending[ref]
                    secs = self.deadline_s(env, r, len(share))
                    why = f"hung: no answer for {len(share)} items in {secs:g} s"
                    self.hosts.lost(r.host, why)  # killed: its other calls fail, and re-send
                    self._replace(env, r, why)
                    self.resent[env] += len(share)
                    todo += share
        out = [results[i] for i in range(len(items))]
        self.breakers[env].record(out)
        return out

    def _replace(self, env: str, replica: Replica, why: str) -> None:
        """Count a replica lost (its host died or hung, or its pool did not start) and start
        a fresh one in its place, on its node if that is still a trainer node, after a
        backoff, while ``max_restarts`` allows."""
        e = self._envs[env]
        e.last_failure = why
        if replica not in self.replicas[env]:
            return
        self.replicas[env].remove(replica)
        self.lost[env] += 1
        if replica.alive:  # a pool that failed to start: nothing of it runs on its host
            replica.host.actor.close.remote(replica.key)
        breaker = self.breakers[env]
        if breaker.recent_restarts() >= e.spec.max_restarts:  # a crash loop: no more
            return
        time.sleep(min(MAX_BACKOFF_S, e.spec.restart_backoff_s * 2 ** breaker.recent_restarts()))
        self.replicas[env].append(self._place(e, replica.host.node))
        self.restarted[env] += 1
        breaker.restarted()

    def _exhausted(self, env: str, unscored: int) -> str:
        e = self._envs[env]
        failure = e.last_failure if len(e.last_failure) < 600 else e.last_failure[:600] + "..."
        return (
            f"every pool of env {env!r} died or hung and its restarts are used up "
            f"(EnvSpec.max_restarts = {e.spec.max_restarts} within {RESTART_WINDOW_S / 60:.0f}"
            f" minutes; {self.restarted[env]} made in the run); "
            f"{unscored} items unscored. Last failure: {failure}. See the env's worker logs "
            f"in {self.log_dir or '(no log dir set)'} and the Ray logs of its pool hosts "
            f"(PoolHost actors); raise max_restarts in the env's [[envs]] entry if the "
            f"failures are transient"
        )

    def stats(self) -> dict[str, list[dict[str, int]]]:
        import ray

        return {
            env: ray.get([r.host.actor.counters.remote(r.key) for r in rs])
            for env, rs in self.replicas.items()
        }

    def metrics(self) -> dict[str, float]:
        """Per env: the pools' counters summed over every replica as of its last answer, a
        dead replica's included (``pool_metrics``); ``envs/<env>/replicas_alive``,
        ``replicas_lost`` (died or hung: a replica on a host found dead counts at once, before
        its env's next call replaces it), ``replicas_restarted``, ``resent`` (items re-sent
        because their replica died or hung) and ``quarantined`` (0/1). Run totals, all envs:
        ``restarts/pool``, ``restarts/worker``, ``items_rescored``, ``envs_quarantined``.
        Asks no actor: free to call every step."""
        out: dict[str, float] = {}
        for env, listed in self.replicas.items():
            alive = sum(r.alive for r in listed)
            out.update(pool_metrics(env, self._counters[env].values()))
            out[f"envs/{env}/replicas_alive"] = float(alive)
            out[f"envs/{env}/replicas_lost"] = float(self.lost[env] + len(listed) - alive)
            out[f"envs/{env}/replicas_restarted"] = float(self.restarted[env])
            out[f"envs/{env}/resent"] = float(self.resent[env])
        return self._totals(
            out, pool_restarts=sum(self.restarted.values()), rescored=sum(self.resent.values())
        )

    def close(self) -> None:
        """Stop every live replica's workers (one that does not answer within
        ``HANG_MARGIN_S`` has its host killed), then end the pool hosts, freeing their CPUs."""
        self._close([r for rs in self.replicas.values() for r in rs])
        self.hosts.close()

    def _close(self, replicas: list[Replica]) -> None:
        """Stop these replicas' pools; a host that does not answer in time is killed."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        refs = {r.host.actor.close.remote(r.key): r for r in replicas if r.alive}
        if not refs:
            return
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=HANG_MARGIN_S)
        for ref in done:
            try:
                ray.get(ref)
            except (ActorDiedError, ActorUnavailableError) as e:
                self.hosts.lost(refs[ref].host, f"{type(e).__name__}: {e}")
        for ref in late:
            self.hosts.lost(refs[ref].host, f"hung: no answer to close in {HANG_MARGIN_S:g} s")
