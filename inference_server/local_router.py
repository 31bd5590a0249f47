"""``LocalRouter``: the ``EngineRouter`` interface over engine objects in the driver's own
process (``cluster.mode = "local"``): no Ray, no restarts (an engine in this process dies
with it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from common.transfer import TensorMeta
from common.weights import HostState
from inference_server.protocol import GenerateRequest, GenerateResult
from inference_server.router import split, sync_metrics, transfer_ranks


class LocalRouter:
    """The ``EngineRouter`` interface over engine objects in this process (no Ray)."""

    def __init__(self, engines: Mapping[str, Any], calls_per_engine: int = 1) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines = dict(engines)
        self.calls_per_engine = calls_per_engine
        self.membership = 0
        """Never changes: engines in this process never leave (``EngineRouter``'s)."""

    def generate(
        self,
        requests: Sequence[GenerateRequest],
        on_result: Callable[[GenerateResult], Any] | None = None,
    ) -> list[GenerateResult]:
        """Results in request order, each handed to ``on_result`` as soon as its call
        returned; several engines take turns by request, each share in up to
        ``calls_per_engine`` calls."""
        engines = list(self.engines.values())
        shares = [list(requests[i :: len(engines)]) for i in range(len(engines))]
        done: dict[str, GenerateResult] = {}
        for engine, share in zip(engines, shares, strict=True):
            for chunk in split(share, self.calls_per_engine) if share else []:
                for res in engine.generate(chunk):
                    done[res.request_id] = res
                    if on_result is not None:
                        on_result(res)
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
        """``EngineRouter.metrics``' keys (engines in this process never die or restart)."""
        counters = ("restarting", "draining", "joined", "left", "requeued", "hangs")
        return {
            "engines/alive": float(len(self.engines)),
            "engines/dead": 0.0,
            **{f"engines/{k}": 0.0 for k in counters},
            "requests_requeued": 0.0,
            "restarts/engine": 0.0,
        }

    def versions(self) -> dict[str, int]:
        return {eid: e.served_version() for eid, e in self.engines.items()}

    def close(self) -> None:
        """Stop engine processes (vLLM) now, not at interpreter exit."""
        for e in self.engines.values():
            e.shutdown()
