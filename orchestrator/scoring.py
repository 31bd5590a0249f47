"""Score completions with the envs their prompts belong to, as the engines hand them over.

``Streaming`` takes each group the moment the router has it (``add``) and queues its
items on its env's lane. A lane is a thread that sends everything queued for its env as
one pool call, then what queued meanwhile as the next: envs score in parallel, each env's
calls one after another (a pool's deadline assumes it is not shared), and a step's
scoring runs while the engines still generate. ``wait`` returns the rewards grouped like
the requests once the last lane is done.

Errors stay errors (a ``RewardResult`` with ``error`` set, never a 0): the caller decides
what an unscored group means. A scorer call that raises (an env with no pool left) fails
``wait``, after every other lane has finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from inference_server.protocol import GenerateResult
from orchestrator.data import Prompt
from reward_envs.protocol import Item, RewardResult

MAX_LANES = 64
"""Envs scored at the same time (threads of one ``Streaming``)."""


class Scorer(Protocol):
    """``reward_envs.scorer.LocalScorer`` or ``RayScorer``."""

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]: ...


class Streaming:
    """Rewards for the completions of ``prompts[i]`` (request ``ids[i]``), scored as each
    request's result arrives (``add``, from any thread); ``wait`` for all of them."""

    def __init__(self, scorer: Scorer, prompts: Sequence[Prompt], ids: Sequence[str]) -> None:
        if len(prompts) != len(ids):
            raise ValueError(f"{len(prompts)} prompts for {len(ids)} request ids")
        self.scorer = scorer
        self.prompts = list(prompts)
        self.index = {rid: i for i, rid in enumerate(ids)}
        self.scores: list[list[RewardResult] | None] = [None] * len(ids)
        self.queued: dict[str, list[tuple[int, GenerateResult]]] = {}
        self.added: set[int] = set()
        self.running: set[str] = set()
        """Envs whose lane is scoring or about to (it leaves when its queue is empty)."""
        self.lanes: list[Future[None]] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(
            min(MAX_LANES, len({p.env for p in prompts}) or 1), thread_name_prefix="score"
        )
        self.busy_s = 0.0
        """Seconds spent in pool calls, summed over lanes."""

    def add(self, result: GenerateResult) -> None:
        """Queue ``result``'s completions on its env's lane (started when idle)."""
        i = self.index[result.request_id]
        env = self.prompts[i].env
        with self.lock:
            if i in self.added:
                raise ValueError(f"request {result.request_id!r} was handed over twice")
            self.added.add(i)
            self.queued.setdefault(env, []).append((i, result))
            if env not in self.running:  # its lane ended (or never started): start one
                self.running.add(env)
                self.lanes.append(self.pool.submit(self._drain, env))

    def _drain(self, env: str) -> None:
        """Score what is queued for ``env``, one call per turn, until nothing is left."""
        while True:
            with self.lock:
                batch = self.queued.pop(env, [])
                if not batch:
                    self.running.discard(env)
                    return
            items = [
                Item(self.prompts[i].text, c.text, dict(self.prompts[i].fields))
                for i, res in batch
                for c in res.completions
            ]
            t0 = time.perf_counter()
            try:
                got = iter(self.scorer.score(env, items))
            except BaseException:
                with self.lock:
                    self.running.discard(env)  # a later add starts a lane (and fails too)
                raise
            with self.lock:
                self.busy_s += time.perf_counter() - t0
                for i, res in batch:
                    self.scores[i] = [next(got) for _ in res.completions]

    def wait(self) -> list[list[RewardResult]]:
        """Every request's rewards, in request order (each request must have been added)."""
        errors = []
        for lane in list(self.lanes):
            try:
                lane.result()
            except Exception as e:  # the others finish first: no call left running
                errors.append(e)
        if errors:
            raise errors[0]
        missing = [rid for rid, i in self.index.items() if self.scores[i] is None]
        if missing:
            raise RuntimeError(f"{len(missing)} requests never scored, e.g. {missing[:3]}")
        return [s for s in self.scores if s is not None]

    def close(self) -> None:
        """Let the pool calls under way finish (after a failed ``generate`` too), then stop
        the lanes."""
        self.pool.shutdown(wait=True)


def score_groups(
    scorer: Scorer, prompts: Sequence[Prompt], results: Sequence[GenerateResult]
) -> list[list[RewardResult]]:
    """Rewards for every completion of every prompt, grouped like ``results`` (all results
    at hand: ``Streaming`` with everything added at once)."""
    stream = Streaming(scorer, prompts, [r.request_id for r in results])
    try:
        for r in results:
            stream.add(r)
        return stream.wait()
    finally:
        stream.close()
