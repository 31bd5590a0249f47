"""Spread generation over engines; survive an engine dying; push weights to all.

Two routers with one interface (``generate``, ``update_weights``, ``probe``,
``metrics``, ``close``): ``EngineRouter`` over Ray engine actors, and ``LocalRouter``
over an engine object in the driver's own process (``cluster.mode = "local"``,
``inference_server.local_router``).

The router is a plain object in the driver holding Ray actor handles. Each
request goes to the live engine with the least outstanding work (sampled
tokens it may still produce: ``n * max_tokens`` summed over its requests in
flight); the requests an engine gets from one call travel together, so it can
batch them. When an engine dies, or hangs (misses the deadline its measured speed
gives its work, or a heartbeat), it is killed, every request it held is re-queued on
the others, and it is started again with the trainer's current weights, at most
``inference.max_restarts`` times; so a request is answered exactly once or the call
raises naming the requests left unserved. Engines can also join a run (``add``) and
leave it (``drain``: no new work, killed once it finished what it holds). Weight updates
are put in Ray's object store once, as numpy arrays (read zero-copy on the same node;
bench/results/weight_transport.md), and fetched by every engine from there; the
logprob probe then checks them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.transfer import TensorMeta
from common.weights import HostState
from inference_server.actors import EngineSpawner
from inference_server.config import InferenceConfig
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
            (m.get("weight_sync/pause_seconds", 0.0) for m in per_engine), default=0.0
        ),
        "weight_sync/buckets": max(
            (m.get("weight_sync/buckets", 0.0) for m in per_engine), default=0.0
        ),
    }


def transfer_ranks(workers: Mapping[str, int]) -> dict[str, int]:
    """Each engine's first rank in the weight-push group: the trainer is rank 0, then the
    engines' workers in order."""
    ranks, nxt = {}, 1
    for eid, n in workers.items():
        ranks[eid], nxt = nxt, nxt + n
    return ranks


def split(requests: Sequence[GenerateRequest], calls: int) -> list[list[GenerateRequest]]:
    """``requests`` in up to ``calls`` contiguous runs of near-equal size (none empty)."""
    calls = max(1, min(calls, len(requests)))
    size, extra = divmod(len(requests), calls)
    out, start = [], 0
    for i in range(calls):
        end = start + size + (i < extra)
        out.append(list(requests[start:end]))
        start = end
    return out


def _work(r: GenerateRequest) -> int:
    return r.sampling.n * r.sampling.max_tokens


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


MAX_BACKOFF_S = 60.0
"""Longest wait before restarting an engine (``inference.restart_backoff_s`` doubles)."""
TPS_EMA = 0.3
"""Weight of the newest measurement in an engine's tokens-per-second average."""


@dataclass
class _Restart:
    """An engine between its actor's end and its replacement entering service."""

    not_before: float
    """Monotonic time its replacement may be started (the backoff)."""
    handle: Any = None
    """The replacement, once started."""
    ready: Any = None
    """Ref of the replacement's first call: it is ready when this resolves."""
    started: float = 0.0


@dataclass
class _Chunk:
    """Requests sent to one engine in one call."""

    engine_id: str
    requests: list[GenerateRequest]
    sent: float


class EngineRouter:
    """Least-outstanding-work dispatch over engine actors; an engine that dies or hangs is
    killed, its requests re-queued on the others, and started again (``spawner``) up to
    ``config.max_restarts`` times.

    ``restore(engine_id, handle)``, when set, gives a replacement the trainer's current
    weights; the replacement enters service only after it returned. ``membership`` counts
    the changes of the set of serving engine actors (one left service, or a replacement
    entered): a weight-push group formed before a change must be formed again.
    Replacements start and enter service while the router is called (``generate``,
    ``poll``; the weight calls start them but let none in, so a push never meets a member
    that did not join its group). Engines join (``add``, after ``restore``) and leave
    (``drain``) while the run goes on; each also changes ``membership``."""

    def __init__(
        self,
        engines: Mapping[str, Any],
        spawner: EngineSpawner | None = None,
        config: InferenceConfig | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines = dict(engines)
        """Engine id -> the actor serving it (the last one that entered service)."""
        self.spawner = spawner
        """Starts an engine again; None: a lost engine is retired at once."""
        self.config = config or InferenceConfig()
        self.outstanding = dict.fromkeys(self.engines, 0)
        self.dead: dict[str, str] = {}
        """Engine id -> why it was retired for good."""
        self.restarting: dict[str, _Restart] = {}
        self.restarts = dict.fromkeys(self.engines, 0)
        """Engine id -> replacements started for it (run total)."""
        self.recent: dict[str, deque[float]] = {}
        """Engine id -> when it was restarted within ``inference.restart_window_s``."""
        self.lost: dict[str, str] = {}
        """Engine id -> why its last actor was taken out of service."""
        self.requeued = 0
        """Requests re-sent to another engine because theirs died or hung."""
        self.hangs = 0
        """Engines found hung (a missed generate deadline or heartbeat)."""
        self.membership = 0
        """Changes of the set of serving engine actors (run total)."""
        self.tokens_per_s: dict[str, float] = {}
        """Engine id -> sampled tokens per second, averaged over its generate calls."""
        self.restore: Callable[[str, Any], None] | None = None
        """Called as ``restore(engine_id, handle)`` with a started replacement before it
        enters service (``orchestrator.parts`` loads the trainer's current weights)."""
        self.draining: set[str] = set()
        """Engines that get no new requests and leave once they hold none (``drain``)."""
        self.left: dict[str, str] = {}
        """Engine id -> why it left the run (drained): for good, and not a fault."""
        self.joined = 0
        """Engines that joined the run after its start (``add``; run total)."""

    @property
    def alive(self) -> list[str]:
        """Engines in service (draining ones too: they finish their work and take pushes)."""
        gone = self.dead.keys() | self.restarting.keys() | self.left.keys()
        return [e for e in self.engines if e not in gone]

    def add(self, engine_id: str, handle: Any) -> None:
        """A started engine joins: ``restore`` first, then it is in service."""
        if engine_id in self.engines:
            raise ValueError(f"engine {engine_id!r} is already one of this router's")
        if self.restore is not None:
            self.restore(engine_id, handle)
        self.engines[engine_id] = handle
        self.outstanding[engine_id] = self.restarts[engine_id] = 0
        self.joined += 1
        self.membership += 1

    def drain(self, engine_id: str) -> None:
        """Send ``engine_id`` no new requests; once it holds none (at once if it holds none
        now, else when ``generate``/``poll`` see its work done) its actor is killed and it
        leaves for good. A restarting engine leaves at once. The last engine in service
        cannot leave."""
        if engine_id not in self.engines:
            raise ValueError(f"no engine {engine_id!r}: the engines are {list(self.engines)}")
        if engine_id in self.dead or engine_id in self.left:
            raise ValueError(f"engine {engine_id!r} has already left the run")
        if not [e for e in self.alive if e != engine_id and e not in self.draining]:
            raise ValueError(
                f"engine {engine_id!r} is the last engine in service and cannot be drained: "
                "a run needs one; add an engine first"
            )
        self.draining.add(engine_id)
        if engine_id in self.restarting or self.outstanding[engine_id] == 0:
            self._leave(engine_id, "drained")

    def _stop(self, engine_id: str) -> None:
        """Kill ``engine_id``'s actor, or its replacement while it restarts."""
        import ray

        restart = self.restarting.pop(engine_id, None)
        handle = restart.handle if restart else self.engines[engine_id]
        if handle is not None:
            ray.kill(handle, no_restart=True)  # a hung process too: SIGKILL after a grace
        if not restart:
            self.membership += 1  # it was serving
        self.outstanding[engine_id] = 0

    def _leave(self, engine_id: str, why: str) -> None:
        """A draining engine leaves for good (``drain``)."""
        self.draining.discard(engine_id)
        self._stop(engine_id)
        self.left[engine_id] = why

    def _lose(self, engine_id: str, why: str) -> None:
        """Kill ``engine_id``'s actor (it died or hung, or its replacement failed); start it
        again after the backoff, or retire it for good once its restarts are spent. A
        draining engine just leaves (an engine that left is left alone)."""
        if engine_id in self.left:
            return
        if engine_id in self.draining:
            self._leave(engine_id, f"drained; it ended while draining: {why}")
            return
        self._stop(engine_id)
        self.lost[engine_id] = why
        recent = self.recent.setdefault(engine_id, deque())
        now = time.monotonic()
        while recent and now - recent[0] > self.config.restart_window_s:
            recent.popleft()
        n = len(recent)  # restarts within the window: a crash loop is retired
        if self.spawner is None or n >= self.config.max_restarts:
            self.dead[engine_id] = why
            return
        recent.append(now)
        self.restarts[engine_id] += 1
        backoff = min(MAX_BACKOFF_S, self.config.restart_backoff_s * 2**n)
        self.restarting[engine_id] = _Restart(not_before=time.monotonic() + backoff)

    def poll(self, admit: bool = True) -> None:
        """Start the replacements whose backoff is over; with ``admit``, put the ready ones
        in service after ``restore`` and let the draining engines that hold no work leave.
        Returns at once."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if admit:
            for eid in [e for e in self.draining if self.outstanding[e] == 0]:
                self._leave(eid, "drained")
        now = time.monotonic()
        for eid, r in list(self.restarting.items()):
            if r.handle is None:
                if now >= r.not_before and self.spawner is not None:
                    r.handle, r.started = self.spawner.spawn(eid), now
                    r.ready = r.handle.inflight.remote()
                continue
            if not admit:
                continue
            if not ray.wait([r.ready], timeout=0)[0]:
                if self.spawner is not None and now - r.started > self.spawner.timeout_s:
                    self._lose(
                        eid, f"its replacement did not start within {self.spawner.timeout_s:.0f} s"
                    )
                continue
            try:
                ray.get(r.ready)
                if self.restore is not None:
                    self.restore(eid, r.handle)
            except (ActorDiedError, ActorUnavailableError) as e:
                self._lose(eid, _why(e))
                continue
            del self.restarting[eid]
            self.engines[eid] = r.handle
            self.tokens_per_s.pop(eid, None)  # its first call warms up: the first deadline
            self.membership += 1

    def _unavailable(self, unserved: Sequence[GenerateRequest] = ()) -> EngineUnavailable:
        left = (
            f"; {len(unserved)} requests were not served: {[r.request_id for r in unserved][:10]}"
            if unserved
            else ""
        )
        return EngineUnavailable(
            f"all {len(self.engines) - len(self.left)} engines are dead ({self.dead}), after "
            f"{sum(self.restarts.values())} restarts (at most inference.max_restarts = "
            f"{self.config.max_restarts} per engine within inference.restart_window_s = "
            f"{self.config.restart_window_s:g} s"
            + ("" if self.spawner else "; this router has no spawner to restart engines")
            + f"){left}"
        )

    def _allowance(self, engine_id: str) -> float:
        """Seconds ``engine_id`` gets for its outstanding work before it counts as hung."""
        c, tps = self.config, self.tokens_per_s.get(engine_id)
        if tps is None:
            return c.first_generate_timeout_s
        return max(c.hang_timeout_s, c.hang_factor * self.outstanding[engine_id] / tps)

    def generate(
        self,
        requests: Sequence[GenerateRequest],
        on_result: Callable[[GenerateResult], Any] | None = None,
    ) -> list[GenerateResult]:
        """Results in request order, each request served exactly once by some engine, and
        each handed to ``on_result`` as soon as its call returns. An engine's share goes out
        in up to ``inference.calls_per_engine`` calls. An engine that dies or misses its
        deadline (its outstanding work at ``inference.hang_factor`` x its measured speed, at
        least ``hang_timeout_s``) or a heartbeat is killed and its requests re-queued; with
        no engine in service this waits for a restart."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one generate() call")
        cfg = self.config
        pending: deque[GenerateRequest] = deque(requests)
        inflight: dict[Any, _Chunk] = {}
        deadline: dict[str, float] = {}  # engine id -> when its outstanding work is late
        last_done: dict[str, float] = {}  # engine id -> when it last answered a chunk
        pings: dict[Any, tuple[str, float]] = {}  # heartbeat ref -> (engine id, sent)
        next_beat = time.monotonic() + cfg.heartbeat_s
        results: dict[str, GenerateResult] = {}

        def lose(eid: str, why: str) -> None:  # requeue what it held, then restart it
            for ref, c in list(inflight.items()):
                if c.engine_id == eid:
                    del inflight[ref]  # a late answer is never read
                    pending.extend(c.requests)
                    self.requeued += len(c.requests)
            for ref, (e, _) in list(pings.items()):
                if e == eid:
                    del pings[ref]
            deadline.pop(eid, None)
            self._lose(eid, why)

        while pending or inflight:
            self.poll()
            now = time.monotonic()
            if pending:  # one call per engine: the engine batches what it gets
                alive = [e for e in self.alive if e not in self.draining] or self.alive
                if not alive and not self.restarting:
                    raise self._unavailable(
                        [*pending, *(q for c in inflight.values() for q in c.requests)]
                    )
                chunks: dict[str, list[GenerateRequest]] = {}
                while pending and alive:
                    r = pending.popleft()
                    eid = min(alive, key=lambda e: self.outstanding[e])
                    chunks.setdefault(eid, []).append(r)
                    self.outstanding[eid] += _work(r)
                for eid, share in chunks.items():
                    for chunk in split(share, cfg.calls_per_engine):
                        ref = self.engines[eid].generate.remote(chunk)
                        inflight[ref] = _Chunk(eid, chunk, now)
                    deadline[eid] = max(deadline.get(eid, 0.0), now + self._allowance(eid))
            if now >= next_beat:  # a cheap call to every busy engine
                beating = {e for e, _ in pings.values()}
                for eid in {c.engine_id for c in inflight.values()} - beating:
                    pings[self.engines[eid].inflight.remote()] = (eid, now)
                next_beat = now + cfg.heartbeat_s
            waits = [r.ready for r in self.restarting.values() if r.ready is not None] + [
                *inflight,
                *pings,
            ]
            wake = min(
                [next_beat, *deadline.values()]
                + [t + cfg.heartbeat_timeout_s for _, t in pings.values()]
                + [r.not_before for r in self.restarting.values() if r.handle is None]
            )
            timeout = min(max(0.0, wake - now), cfg.heartbeat_s)
            if waits:
                done, _ = ray.wait(waits, num_returns=1, timeout=timeout)
            else:
                time.sleep(timeout)
                done = []
            for ref in done:
                if ref in pings:
                    eid, _ = pings.pop(ref)
                    try:
                        ray.get(ref)
                    except (ActorDiedError, ActorUnavailableError) as e:
                        lose(eid, _why(e))
                elif ref in inflight:
                    c = inflight.pop(ref)
                    self.outstanding[c.engine_id] -= sum(_work(r) for r in c.requests)
                    try:
                        got = ray.get(ref)
                    except (ActorDiedError, ActorUnavailableError) as e:
                        pending.extend(c.requests)
                        self.requeued += len(c.requests)
                        lose(c.engine_id, _why(e))
                        continue
                    for r, res in zip(c.requests, got, strict=True):
                        results[r.request_id] = res
                        if on_result is not None:
                            on_result(res)
                    self._measure(c, got, last_done)
                    now = time.monotonic()
                    if self.outstanding[c.engine_id] > 0:
                        deadline[c.engine_id] = now + self._allowance(c.engine_id)
                    else:
                        deadline.pop(c.engine_id, None)
            now = time.monotonic()
            for eid, t in list(deadline.items()):
                if now > t:
                    self.hangs += 1
                    lose(eid, f"hung: its generate work was due {now - t:.1f} s ago")
            for eid, t in list(pings.values()):
                if now - t > cfg.heartbeat_timeout_s and eid in self.alive:
                    self.hangs += 1
                    lose(
                        eid, f"hung: no answer to a heartbeat within {cfg.heartbeat_timeout_s:g} s"
                    )
        return [results[i] for i in ids]

    def _measure(self, c: _Chunk, got: Sequence[GenerateResult], last: dict[str, float]) -> None:
        """Fold the chunk's sampled tokens per second into its engine's average (timed from
        when it was sent, or from the engine's previous answer if later: calls queue)."""
        now = time.monotonic()
        seconds = now - max(c.sent, last.get(c.engine_id, 0.0))
        last[c.engine_id] = now
        tokens = sum(len(x.token_ids) for res in got for x in res.completions)
        if tokens <= 0 or seconds <= 0:
            return
        old = self.tokens_per_s.get(c.engine_id)
        tps = tokens / seconds
        self.tokens_per_s[c.engine_id] = tps if old is None else (1 - TPS_EMA) * old + TPS_EMA * tps

    def _gather(self, refs: Mapping[str, Any]) -> dict[str, Any]:
        """The answers of the engines called (``refs``: id -> ref); an engine that died, or
        hung (a heartbeat unanswered for ``inference.heartbeat_timeout_s`` while its answer
        is awaited: weight calls have no deadline of their own, a big push may take long), is
        taken out of service and restarted. Empty while every engine is restarting (they
        get the weights from ``restore``); raises if every engine is retired."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        cfg = self.config
        out: dict[str, Any] = {}
        waiting = {ref: eid for eid, ref in refs.items()}
        pings: dict[str, tuple[Any, float]] = {}  # engine id -> (heartbeat ref, sent)
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=cfg.heartbeat_s)
            for ref in done:
                eid = waiting.pop(ref)
                pings.pop(eid, None)
                try:
                    out[eid] = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError) as e:
                    self._lose(eid, _why(e))
            now = time.monotonic()
            for ref, eid in list(waiting.items()):
                ping = pings.get(eid)
                if ping is None:
                    pings[eid] = (self.engines[eid].inflight.remote(), now)
                elif ray.wait([ping[0]], timeout=0)[0]:
                    pings[eid] = (self.engines[eid].inflight.remote(), now)
                elif now - ping[1] > cfg.heartbeat_timeout_s:
                    del waiting[ref], pings[eid]
                    self.hangs += 1
                    self._lose(eid, f"no heartbeat for {cfg.heartbeat_timeout_s:g} s (hung)")
        if not out and not self.restarting:
            raise self._unavailable()
        return out

    def _all(self, call: Any) -> dict[str, Any]:
        """Run ``call(handle)`` on every engine in service (``_gather``)."""
        self.poll(admit=False)
        return self._gather({eid: call(self.engines[eid]) for eid in self.alive})

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
        workers = self._all(lambda h: h.transfer_workers.remote())
        ranks = transfer_ranks(workers)
        self._gather(
            {e: self.engines[e].join_transfer.remote(address, port, ranks[e], world) for e in ranks}
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
        """Max probe difference over the engines in service (0 while all restart); raises if
        any engine is off."""
        per = self._all(lambda h: h.probe.remote(sequences, expected, tol))
        return max(per.values(), default=0.0)

    def metrics(self) -> dict[str, float]:
        """Engines in service, retired for good, restarting and draining; run totals of
        engines that joined and left, requests re-queued because their engine died or hung
        (under two names), engine restarts and hangs found."""
        return {
            "engines/alive": float(len(self.alive)),
            "engines/dead": float(len(self.dead)),
            "engines/restarting": float(len(self.restarting)),
            "engines/draining": float(len(self.draining)),
            "engines/joined": float(self.joined),
            "engines/left": float(len(self.left)),
            "engines/requeued": float(self.requeued),
            "requests_requeued": float(self.requeued),
            "restarts/engine": float(sum(self.restarts.values())),
            "engines/hangs": float(self.hangs),
        }

    def versions(self) -> dict[str, int]:
        """Weight version each engine in service serves."""
        return self._all(lambda h: h.served_version.remote())

    def states(self) -> dict[str, str]:
        """Every engine the run had -> ``serving``, ``draining``, ``restarting``, ``left`` or
        ``dead`` (no remote call)."""
        kinds: dict[str, Collection[str]] = {
            "left": self.left,
            "dead": self.dead,
            "restarting": self.restarting,
            "draining": self.draining,
        }
        return {e: next((k for k, c in kinds.items() if e in c), "serving") for e in self.engines}

    def close(self) -> None:
        """Nothing to do: the engine actors end with the Ray cluster."""
