"""Spread generation over engines; survive an engine dying; push weights to all.

Two routers with one interface (``generate``, ``update_weights``, ``probe``,
``metrics``, ``close``): ``EngineRouter`` over Ray engine actors, and ``LocalRouter``
over an engine object in the driver's own process (``cluster.mode = "local"``).

The router is a plain object in the driver holding Ray actor handles. Each
request goes to the live engine with the least outstanding work (sampled
tokens it may still produce: ``n * max_tokens`` summed over its requests in
flight); the requests an engine gets from one call travel together, so it can
batch them. When an engine dies, every request it held is re-queued on the others,
so a request is answered exactly once or the call raises naming the requests
left unserved. Weight updates are put in Ray's object store once, as numpy
arrays (read zero-copy on the same node; bench/results/weight_transport.md), and
fetched by every engine from there; the logprob probe then checks them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from common.transfer import TensorMeta
from common.weights import HostState
from inference_server.protocol import GenerateRequest, GenerateResult


class EngineUnavailable(RuntimeError):
    """No live engine is left to serve requests."""


def sync_metrics(t0: float, per_engine: list[Mapping[str, float]]) -> dict[str, float]:
    """A weight push's metrics: seconds since ``t0``, engines reached, the longest pause,
    buckets sent."""
    import time

    return {
        "weight_sync/seconds": time.perf_counter() - t0,
        "weight_sync/engines": float(len(per_engine)),
        "weight_sync/pause_seconds": max(
            m.get("weight_sync/pause_seconds", 0.0) for m in per_engine
        ),
        "weight_sync/buckets": max(m.get("weight_sync/buckets", 0.0) for m in per_engine),
    }


def transfer_ranks(workers: Mapping[str, int]) -> dict[str, int]:
    """Each engine's first rank in the weight-push group: the trainer is rank 0, then the
    engines' workers in order."""
    ranks, nxt = {}, 1
    for eid, n in workers.items():
        ranks[eid], nxt = nxt, nxt + n
    return ranks


def _work(r: GenerateRequest) -> int:
    return r.sampling.n * r.sampling.max_tokens


class EngineRouter:
    """Least-outstanding-work dispatch over engine actors, with re-queue on engine death."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines = dict(engines)
        self.outstanding = dict.fromkeys(self.engines, 0)
        self.dead: dict[str, str] = {}
        """Engine id -> why it was taken out of service."""
        self.requeued = 0
        """Requests re-sent to another engine because theirs died."""

    @property
    def alive(self) -> list[str]:
        return [e for e in self.engines if e not in self.dead]

    def _retire(self, engine_id: str, why: BaseException) -> None:
        if engine_id not in self.dead:
            self.dead[engine_id] = f"{type(why).__name__}: {why}".splitlines()[0][:300]

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Results in request order, each request served exactly once by some live engine."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one generate() call")
        pending: deque[GenerateRequest] = deque(requests)
        inflight: dict[Any, tuple[str, list[GenerateRequest]]] = {}
        results: dict[str, GenerateResult] = {}
        while pending or inflight:
            if pending:  # one call per engine: the engine batches what it gets
                alive = self.alive
                if not alive:
                    unserved = [*pending, *(q for _, rs in inflight.values() for q in rs)]
                    raise EngineUnavailable(
                        f"all {len(self.engines)} engines are dead ({self.dead}); "
                        f"{len(unserved)} requests were not served: "
                        f"{[r.request_id for r in unserved][:10]}"
                    )
                chunks: dict[str, list[GenerateRequest]] = {}
                while pending:
                    r = pending.popleft()
                    eid = min(alive, key=lambda e: self.outstanding[e])
                    chunks.setdefault(eid, []).append(r)
                    self.outstanding[eid] += _work(r)
                for eid, chunk in chunks.items():
                    inflight[self.engines[eid].generate.remote(chunk)] = (eid, chunk)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                eid, chunk = inflight.pop(ref)
                self.outstanding[eid] -= sum(_work(r) for r in chunk)
                try:
                    for r, res in zip(chunk, ray.get(ref), strict=True):
                        results[r.request_id] = res
                except (ActorDiedError, ActorUnavailableError) as e:
                    self._retire(eid, e)
                    self.requeued += len(chunk)
                    pending.extend(chunk)
        return [results[i] for i in ids]

    def _all(self, call: Any) -> dict[str, Any]:
        """Run ``call(handle)`` on every live engine; engines that died are retired."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        refs = {eid: call(self.engines[eid]) for eid in self.alive}
        out = {}
        for eid, ref in refs.items():
            try:
                out[eid] = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError) as e:
                self._retire(eid, e)
        if not out:
            raise EngineUnavailable(f"all {len(self.engines)} engines are dead ({self.dead})")
        return out

    def update_weights(
        self, version: int, state: Mapping[str, torch.Tensor] | Any, bucket_bytes: int = 1 << 20
    ) -> dict[str, float]:
        """Send ``state`` as ``version`` to every live engine through the object store.
        ``state`` is a state dict, or an object ref to a ``HostState`` already there (the
        trainer's rank 0 returns one, so the weights never pass through this process)."""
        import time

        import ray

        t0 = time.perf_counter()
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(HostState.of(state))
        per = self._all(lambda h: h.update_weights.remote(version, ref, bucket_bytes))
        return sync_metrics(t0, list(per.values()))

    def join_transfer(self, address: str, port: int, world: int) -> None:
        """Every engine's workers join the weight-push group (ranks 1.., in engine order);
        returns once the group has formed (the trainer's rank 0 opens it meanwhile)."""
        import ray

        workers = self._all(lambda h: h.transfer_workers.remote())
        ranks = transfer_ranks(workers)
        ray.get(
            [self.engines[e].join_transfer.remote(address, port, ranks[e], world) for e in ranks]
        )

    def transfer_size(self) -> int:
        """Engine workers that take part in a collective push."""
        return sum(self._all(lambda h: h.transfer_workers.remote()).values())

    def receive_weights(
        self, version: int, meta: Sequence[TensorMeta], bucket_bytes: int
    ) -> dict[str, float]:
        """Every live engine receives the push the trainer broadcasts now, as ``version``."""
        import time

        t0 = time.perf_counter()
        per = self._all(lambda h: h.receive_weights.remote(version, list(meta), bucket_bytes))
        return sync_metrics(t0, list(per.values()))

    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float:
        """Max probe difference over all live engines; raises if any engine is off."""
        return max(self._all(lambda h: h.probe.remote(sequences, expected, tol)).values())

    def metrics(self) -> dict[str, float]:
        """Engines alive and dead, requests re-queued because their engine died (run total)."""
        return {
            "engines/alive": float(len(self.alive)),
            "engines/dead": float(len(self.dead)),
            "engines/requeued": float(self.requeued),
        }

    def versions(self) -> dict[str, int]:
        """Weight version each live engine serves."""
        return self._all(lambda h: h.served_version.remote())

    def close(self) -> None:
        """Nothing to do: the engine actors end with the Ray cluster."""


class LocalRouter:
    """The ``EngineRouter`` interface over engine objects in this process (no Ray)."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines = dict(engines)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Results in request order; several engines take turns by request."""
        engines = list(self.engines.values())
        shares = [list(requests[i :: len(engines)]) for i in range(len(engines))]
        done = {
            res.request_id: res
            for engine, share in zip(engines, shares, strict=True)
            if share
            for res in engine.generate(share)
        }
        return [done[r.request_id] for r in requests]

    def update_weights(
        self,
        version: int,
        state: Mapping[str, torch.Tensor] | HostState,
        bucket_bytes: int = 1 << 20,
    ) -> dict[str, float]:
        """Load ``state`` as ``version`` into every engine."""
        import time

        t0 = time.perf_counter()
        per = [e.update_weights(version, state, bucket_bytes) for e in self.engines.values()]
        return sync_metrics(t0, per)

    def transfer_size(self) -> int:
        return sum(e.transfer_workers() for e in self.engines.values())

    def join_transfer(self, address: str, port: int, world: int) -> None:
        """As ``EngineRouter.join_transfer``; the engines join on threads of their own."""
        ranks = transfer_ranks({eid: e.transfer_workers() for eid, e in self.engines.items()})
        self._each(lambda eid, e: e.join_transfer(address, port, ranks[eid], world))

    def receive_weights(
        self, version: int, meta: Sequence[TensorMeta], bucket_bytes: int
    ) -> dict[str, float]:
        import time

        t0 = time.perf_counter()
        per = self._each(lambda eid, e: e.receive_weights(version, list(meta), bucket_bytes))
        return sync_metrics(t0, per)

    def _each(self, call: Any) -> list[Any]:
        """``call(id, engine)`` for every engine at once (each may wait on the others inside
        one collective), on threads; their answers in engine order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.engines)) as pool:
            futures = [pool.submit(call, eid, e) for eid, e in self.engines.items()]
            return [f.result() for f in futures]

    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float:
        """Max probe difference over the engines; raises if any engine is off."""
        return max(e.probe(sequences, expected, tol) for e in self.engines.values())

    def metrics(self) -> dict[str, float]:
        return {"engines/alive": float(len(self.engines)), "engines/dead": 0.0}

    def versions(self) -> dict[str, int]:
        return {eid: e.served_version() for eid, e in self.engines.items()}

    def close(self) -> None:
        """Stop engine processes (vLLM) now, not at interpreter exit."""
        for e in self.engines.values():
            e.shutdown()
