"""Where env pools run on a Ray cluster: one pool host per trainer node, holding many pools.

``PoolHost`` keeps several ``EnvPool``s in one process, keyed by a replica key, and serves
them from threads: calls for different keys run at once, calls for one key one after the
other (a per-key lock; ``RayScorer`` keeps at most one share in flight per replica anyway).
Each pool's workers are still their env's own interpreter subprocesses (``pool.py``); what
the host saves is a Ray worker process per env: a raylet starts only about as many worker
processes at once as its node has cores, each about a second of CPU to import Ray, so 30 envs
as 30 actors took 38 s to start on 2 cores, and as 30 pools of one host 3-4 s
(bench/results/many_envs.md).

``Hosts`` is the driver's side: one ``PoolHost`` actor per alive node that offers the
``trainer_node`` resource, pinned there (hard node affinity), started when a replica is first
placed on that node and started again after it died. ``place`` starts one env pool on a
host (round robin over the trainer nodes, or on a given node) and returns its ``Replica``.

What a host reserves: an actor's Ray resources are fixed when it starts, and a host's pools
come and go, so a host reserves ``HOST_CPUS`` logical CPU (and a sliver of ``trainer_node``)
for itself, whatever its pools hold. Its env workers' CPUs are not reserved in Ray: they
share the trainer node's cores with the trainer ranks, scheduled by the OS.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_envs.builder import BuiltEnv
from reward_envs.manifest import Manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult

TRAINER_RESOURCE = "trainer_node"

HOST_CPUS = 1.0
"""Logical CPUs a pool host reserves on its trainer node (for itself, not its pools)."""
HOST_CONCURRENCY = 256
"""Threads of a pool host: calls at once (pools starting, scoring, closing); more wait."""


@dataclass
class _Slot:
    pool: EnvPool
    lock: threading.Lock = field(default_factory=threading.Lock)


class PoolHost:
    """Many env pools in one process, each used by one caller at a time."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._closed: set[str] = set()
        """Keys closed before their pool was up: ``start`` stops the pool it made."""
        self._lock = threading.Lock()

    def start(
        self,
        key: str,
        manifest: Manifest,
        built: BuiltEnv,
        workers: int,
        timeout_s: float | None,
        log_dir: Path | None,
    ) -> None:
        """Start a pool under ``key`` and return once its workers said hello (raises
        ``EnvStartError`` if they cannot start). Pools started from several threads start
        side by side. A key closed meanwhile gets its pool stopped at once."""
        with self._lock:
            if key in self._slots:
                raise ValueError(f"pool host: key {key!r} is in use")
            if key in self._closed:
                return
        pool = EnvPool(manifest, built, workers, timeout_s, log_dir=log_dir)
        with self._lock:
            if key not in self._closed:
                self._slots[key] = _Slot(pool)
                return
        pool.close()

    def score_counted(
        self, key: str, items: list[Item], after: None = None
    ) -> tuple[list[RewardResult], dict[str, int]]:
        """``EnvPool.score_counted`` of the pool ``key``. ``after`` is unused here: the driver
        passes the ref of the pool's ``start`` call, so that Ray runs this call only once the
        pool is up (a threaded actor runs calls in any order)."""
        slot = self._slots[key]
        with slot.lock:
            return slot.pool.score_counted(items)

    def counters(self, key: str) -> dict[str, int]:
        return self._slots[key].pool.counters()

    def pids(self, key: str) -> list[int]:
        """The worker process ids of the pool ``key`` (for tests and monitoring)."""
        return self._slots[key].pool.pids()

    def pid(self) -> int:
        """This host's process id (for tests and monitoring)."""
        return os.getpid()

    def keys(self) -> list[str]:
        return sorted(self._slots)

    def close(self, key: str) -> None:
        """Stop the pool ``key``'s workers, once its call in progress (if any) is done. A key
        not (yet) up is remembered: a pool still starting under it is stopped when up."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                self._closed.add(key)
                return
        with slot.lock:
            slot.pool.close()


@dataclass(eq=False)
class Host:
    """A ``PoolHost`` actor on one trainer node, as the driver knows it."""

    node: str
    """Ray node id."""
    actor: Any
    dead: str = ""
    """Why it was given up for dead (killed), or "" while it is deemed alive."""


@dataclass(eq=False)
class Replica:
    """One pool of an env on a host: ``host.actor``'s methods take ``key``."""

    env: str
    host: Host
    key: str
    started: Any = None
    """The ref of the host's ``start`` call until the pool has answered once (its first score
    call waits on it), else None."""

    @property
    def alive(self) -> bool:
        return not self.host.dead


class Hosts:
    """The pool hosts of one ``RayScorer``: one per trainer node, started when needed."""

    def __init__(self) -> None:
        import ray

        opts: dict[str, Any] = {
            "num_cpus": HOST_CPUS,
            "resources": {TRAINER_RESOURCE: 1e-3},
            "max_concurrency": HOST_CONCURRENCY,  # a threaded actor: pools served side by side
        }
        self._actor = ray.remote(**opts)(PoolHost)
        self.live: dict[str, Host] = {}
        """Node id -> its host, while deemed alive."""
        self.all: list[Host] = []
        """Every host started, dead ones included (``close`` ends them all)."""
        self._lock = threading.Lock()
        self._turn = 0
        self._keys = itertools.count()

    @staticmethod
    def nodes() -> list[str]:
        """Ids of the alive nodes that offer ``TRAINER_RESOURCE``."""
        import ray

        return sorted(
            n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get(TRAINER_RESOURCE)
        )

    def _host(self, node: str | None) -> Host:
        """The live host of ``node`` if it is an alive trainer node, else of the next one in
        turn; started there if it has none."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._lock:
            if node is not None and node in self.live:
                return self.live[node]
            nodes = self.nodes()
            if not nodes:
                raise RuntimeError(
                    f"no alive Ray node offers the {TRAINER_RESOURCE!r} resource: env pools "
                    "have nowhere to run"
                )
            if node not in nodes:
                node = nodes[self._turn % len(nodes)]
                self._turn += 1
            if node not in self.live:
                strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                actor = self._actor.options(scheduling_strategy=strategy).remote()
                self.live[node] = Host(node, actor)
                self.all.append(self.live[node])
            return self.live[node]

    def place(
        self,
        env: str,
        manifest: Manifest,
        built: BuiltEnv,
        workers: int,
        timeout_s: float | None,
        log_dir: Path | None,
        node: str | None = None,
    ) -> Replica:
        """Start a pool of ``env`` on the host of ``node`` (None, or a node gone: the next
        trainer node in turn, so an env's replicas spread over the nodes). Returns at once;
        ``Replica.started`` is the start call's ref."""
        host = self._host(node)
        key = f"{env}#{next(self._keys)}"
        ref = host.actor.start.remote(key, manifest, built, workers, timeout_s, log_dir)
        return Replica(env, host, key, ref)

    def lost(self, host: Host, why: str) -> None:
        """Give ``host`` up (it died, or hung and is killed now): every replica on it is lost,
        and the next replica placed on its node starts a fresh host."""
        import ray

        with self._lock:
            if host.dead:
                return
            host.dead = why
            if self.live.get(host.node) is host:
                del self.live[host.node]
        ray.kill(host.actor, no_restart=True)

    def close(self) -> None:
        """End every host (their pools' workers see their pipes close and exit). Not a loss:
        the replicas' metrics stay as they were."""
        import ray

        with self._lock:
            hosts, self.all, self.live = self.all, [], {}
        for h in hosts:
            ray.kill(h.actor, no_restart=True)
