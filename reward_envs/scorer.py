"""Route items to the pool of the env they belong to: in this process, or on Ray actors.

Both scorers answer ``score(env, items) -> list[RewardResult]``, one result per
item in order. ``LocalScorer`` runs one ``EnvPool`` per env in the caller's
process (single-node runs, the CLI). ``RayScorer`` runs each env's pool as
``replicas`` Ray actors on the trainer nodes' CPUs (``trainer_node`` resource);
items are split across an env's replicas, and the share of a replica that dies
is re-sent to another, so no item is lost. ``metrics()`` is what a run can log per
step: the pools' counters (restarts, errors by kind), replicas alive and lost, items
re-sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reward_envs.builder import BuiltEnv, prepare
from reward_envs.config import EnvSpec
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult

TRAINER_RESOURCE = "trainer_node"


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


class LocalScorer:
    """One pool per env in this process."""

    def __init__(self, specs: Sequence[EnvSpec], log_dir: Path | None = None) -> None:
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

    def remove(self, env: str) -> None:
        """Stop an env's pool (nothing of it may be in flight: the run drains it first)."""
        self.pools.pop(env).close()

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]:
        if env not in self.pools:
            raise KeyError(f"no env named {env!r}; this run has {sorted(self.pools)}")
        return self.pools[env].score(items)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: p.counters() for name, p in self.pools.items()}

    def metrics(self) -> dict[str, float]:
        """Each pool's counters as step metrics (``pool_metrics``)."""
        out: dict[str, float] = {}
        for name, p in self.pools.items():
            out.update(pool_metrics(name, [p.counters()]))
        return out

    def close(self) -> None:
        for p in self.pools.values():
            p.close()


class RayScorer:
    """``replicas`` pool actors per env on trainer-node CPUs."""

    def __init__(self, specs: Sequence[EnvSpec], log_dir: Path | None = None) -> None:
        import ray

        if not ray.cluster_resources().get(TRAINER_RESOURCE):
            raise RuntimeError(
                f"no Ray node offers the {TRAINER_RESOURCE!r} resource, so env pools have "
                f"nowhere to run; start trainer nodes with `ray start ... --resources "
                f"'{{\"{TRAINER_RESOURCE}\": 1}}'` (the SLURM launcher does)"
            )
        self.replicas: dict[str, list[Any]] = {}
        self.log_dir = log_dir
        self.lost: Counter[str] = Counter()
        """Replicas of each env that died (their items went to the others)."""
        self.resent: Counter[str] = Counter()
        """Items of each env re-sent to another replica because theirs died."""
        self._counters: dict[str, dict[Any, dict[str, int]]] = {}
        """env -> replica handle -> its pool's counters as of its last answer (kept after
        it dies, so totals never go down)."""
        try:
            for spec in specs:
                self.add(spec)
        except BaseException:
            self.close()
            raise

    def add(self, spec: EnvSpec) -> None:
        """Start ``spec.replicas`` pool actors for a new env and wait until they run (an env
        registered during a run joins this way)."""
        import ray

        if spec.name in self.replicas:
            raise ValueError(f"env {spec.name!r} is already scored by this run")
        manifest, built = prepare_spec(spec)  # built on the driver, into the shared store
        actor = ray.remote(
            num_cpus=min(spec.workers, manifest.concurrency),
            resources={TRAINER_RESOURCE: 1e-3},
        )(EnvPool)
        handles: list[Any] = [
            actor.remote(manifest, built, spec.workers, spec.timeout_s, self.log_dir)
            for _ in range(spec.replicas)
        ]
        try:
            ray.get([h.pids.remote() for h in handles])
        except BaseException:
            for h in handles:
                ray.kill(h)
            raise
        self.replicas[spec.name] = handles
        self._counters[spec.name] = {}

    def remove(self, env: str) -> None:
        """Stop an env's pool actors (nothing of it may be in flight: the run drains it
        first); its counters are dropped with it."""
        import ray

        handles = self.replicas.pop(env)
        self._close(handles)
        for h in handles:
            ray.kill(h)
        self._counters.pop(env, None)

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if env not in self.replicas:
            raise KeyError(f"no env named {env!r}; this run has {sorted(self.replicas)}")
        results: dict[int, RewardResult] = {}
        todo = list(range(len(items)))
        while todo:
            live = self.replicas[env]
            if not live:
                raise RuntimeError(f"every pool actor of env {env!r} died; {len(todo)} unscored")
            shares = [todo[i :: len(live)] for i in range(len(live))]
            refs = {
                h.score_counted.remote([items[i] for i in share]): (h, share)
                for h, share in zip(live, shares, strict=True)
                if share
            }
            todo = []
            for ref, (h, share) in refs.items():
                try:
                    scored, counters = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError):
                    if h in self.replicas[env]:
                        self.replicas[env].remove(h)
                        self.lost[env] += 1
                    self.resent[env] += len(share)
                    todo += share  # re-sent to the replicas left
                    continue
                results.update(zip(share, scored, strict=True))
                self._counters[env][h] = counters
        return [results[i] for i in range(len(items))]

    def stats(self) -> dict[str, list[dict[str, int]]]:
        import ray

        return {
            env: ray.get([h.counters.remote() for h in hs]) for env, hs in self.replicas.items()
        }

    def metrics(self) -> dict[str, float]:
        """Per env: the pools' counters summed over every replica as of its last answer, a
        dead replica's included (``pool_metrics``); ``envs/<env>/replicas_alive``,
        ``replicas_lost`` and ``resent`` (items re-sent because their replica died). Asks no
        actor: free to call every step."""
        out: dict[str, float] = {}
        for env, live in self.replicas.items():
            out.update(pool_metrics(env, self._counters[env].values()))
            out[f"envs/{env}/replicas_alive"] = float(len(live))
            out[f"envs/{env}/replicas_lost"] = float(self.lost[env])
            out[f"envs/{env}/resent"] = float(self.resent[env])
        return out

    def close(self) -> None:
        """Stop every live replica's workers (a replica that died since its last call is
        skipped: its workers see their pipes close and exit)."""
        self._close([h for hs in self.replicas.values() for h in hs])

    @staticmethod
    def _close(handles: list[Any]) -> None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for ref in [h.close.remote() for h in handles]:
            try:
                ray.get(ref)
            except (ActorDiedError, ActorUnavailableError):
                pass
