"""Route items to the pool of the env they belong to: in this process, or on Ray actors.

Both scorers answer ``score(env, items) -> list[RewardResult]``, one result per
item in order. ``LocalScorer`` runs one ``EnvPool`` per env in the caller's
process (single-node runs, the CLI). ``RayScorer`` runs each env's pool as
``replicas`` Ray actors on the trainer nodes' CPUs (``trainer_node`` resource);
items are split across an env's replicas, and the share of a replica that dies
is re-sent to another, so no item is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_envs.builder import BuiltEnv, prepare
from reward_envs.config import EnvSpec
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult

TRAINER_RESOURCE = "trainer_node"


def prepare_spec(spec: EnvSpec) -> tuple[Manifest, BuiltEnv]:
    """The env's manifest and its build (found in the store or built now)."""
    return load_manifest(spec.path), prepare(spec.path, spec.isolation)


class LocalScorer:
    """One pool per env in this process."""

    def __init__(self, specs: Sequence[EnvSpec], log_dir: Path | None = None) -> None:
        self.pools: dict[str, EnvPool] = {}
        try:
            for spec in specs:
                manifest, built = prepare_spec(spec)
                self.pools[spec.name] = EnvPool(
                    manifest, built, spec.workers, spec.timeout_s, log_dir=log_dir
                )
        except BaseException:
            self.close()
            raise

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]:
        if env not in self.pools:
            raise KeyError(f"no env named {env!r}; this run has {sorted(self.pools)}")
        return self.pools[env].score(items)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: p.counters() for name, p in self.pools.items()}

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
        for spec in specs:
            manifest, built = prepare_spec(spec)  # built on the driver, into the shared store
            actor = ray.remote(
                num_cpus=min(spec.workers, manifest.concurrency),
                resources={TRAINER_RESOURCE: 1e-3},
            )(EnvPool)
            self.replicas[spec.name] = [
                actor.remote(manifest, built, spec.workers, spec.timeout_s, log_dir)
                for _ in range(spec.replicas)
            ]
        ray.get([h.pids.remote() for hs in self.replicas.values() for h in hs])

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
                h.score.remote([items[i] for i in share]): (h, share)
                for h, share in zip(live, shares, strict=True)
                if share
            }
            todo = []
            for ref, (h, share) in refs.items():
                try:
                    results.update(zip(share, ray.get(ref), strict=True))
                except (ActorDiedError, ActorUnavailableError):
                    if h in self.replicas[env]:
                        self.replicas[env].remove(h)
                    todo += share  # re-sent to the replicas left
        return [results[i] for i in range(len(items))]

    def stats(self) -> dict[str, list[dict[str, int]]]:
        import ray

        return {
            env: ray.get([h.counters.remote() for h in hs]) for env, hs in self.replicas.items()
        }

    def close(self) -> None:
        import ray

        ray.get([h.close.remote() for hs in self.replicas.values() for h in hs])
