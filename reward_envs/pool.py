"""A supervised pool of worker processes for one env: failures contained, nothing lost.

``EnvPool.score(items)`` returns exactly one ``RewardResult`` per item, in order.
Workers run the env's code in its own interpreter (venv or Caravela's, see
``builder.py``), one job at a time, over the pipe protocol of ``protocol.py``.
The pool is single-threaded: one ``select`` loop feeds idle workers and watches
deadlines.

- **Timeout**: past ``timeout_s`` per item the worker's whole process group is
  killed (SIGKILL; never ``signal.alarm``, which fails off the main thread) and
  the item becomes a ``timeout`` error. A batch that times out is split and its
  items retried one by one, so one slow item does not fail its neighbours.
- **Crash** (the worker exits, is killed, or its pipe breaks): the worker is
  restarted and the item retried once; a second crash makes it a ``crash`` error.
- **Bad return values** (NaN, inf, str, bool, wrong count) and exceptions are
  ``bad_value`` / ``exception`` errors with the value or exception text.

No error is ever turned into a score of 0; errors are counted in ``stats``.
Every result names the env, its build hash and the worker that produced it.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from reward_envs.builder import BuiltEnv
from reward_envs.manifest import Manifest
from reward_envs.protocol import (
    PROTOCOL_VERSION,
    ErrorKind,
    Hello,
    Item,
    ItemResult,
    ProtocolError,
    RewardResult,
    ScoreReply,
    ScoreRequest,
    decode,
    encode,
)

PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
"""Variables a worker inherits; nothing else (no Ray token, no CUDA, no cloud creds)."""


MAX_FAILED_STARTS = 3
"""A worker slot that dies this many times in a row before saying hello fails the pool."""


class EnvStartError(RuntimeError):
    """An env's workers cannot start (import error, missing interpreter): fix the env."""


@dataclass
class _Job:
    seq: int
    indices: list[int]
    crashes: int = 0


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    job: _Job | None = None
    deadline: float = 0.0
    buf: bytes = b""
    failed_starts: int = 0
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.proc.pid

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    @property
    def name(self) -> str:
        return f"{self.index}:{self.pid}"

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the worker and anything it spawned
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # unflushed request to a dead worker
                    pass

    def lines(self) -> list[bytes] | None:
        """Complete lines available now; None once the worker closed its end (it died)."""
        data = os.read(self.fd, 1 << 20)
        if not data:
            return None
        self.buf += data
        *done, self.buf = self.buf.split(b"\n")
        return done


class EnvPool:
    """K worker processes for one env, supervised from the caller's thread."""

    def __init__(
        self,
        manifest: Manifest,
        built: BuiltEnv,
        workers: int = 2,
        timeout_s: float | None = None,
        log_dir: Path | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.manifest = manifest
        self.built = built
        self.size = max(1, min(workers, manifest.concurrency))
        self.timeout_s = timeout_s or manifest.timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.stats: Counter[str] = Counter()
        """items, scored, errors, errors/<kind>, restarts."""
        self._seq = 0
        self._slot_prefix = f"caravela-{manifest.name}-{secrets.token_hex(4)}"
        self._logs: list[IO[bytes]] = []
        # the call in progress: its items, the results so far, the jobs not yet sent
        self._items: Sequence[Item] = []
        self._results: dict[int, RewardResult] = {}
        self._queue: deque[_Job] = deque()
        self.workers = [self._spawn(i) for i in range(self.size)]
        try:
            self._run()  # wait until every worker said hello
        except BaseException:
            self.close()
            raise

    # -- worker lifecycle -------------------------------------------------------------------
    def _slot(self, index: int) -> str:
        return f"{self._slot_prefix}-{index}"

    def _spawn(self, index: int) -> _Worker:
        passed = PASSED_ENV + (("DOCKER_HOST",) if self.built.backend == "docker" else ())
        env = {k: v for k, v in os.environ.items() if k in passed}
        env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
        stderr: int | IO[bytes] = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{self.manifest.name}-worker{index}.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            stderr = log
        try:
            proc = subprocess.Popen(
                self.built.command(self.manifest, self._slot(index)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=self.built.src if self.built.backend == "local" else None,
                start_new_session=True,
            )
        except OSError as e:
            raise EnvStartError(
                f"env {self.manifest.name!r}: cannot start its worker ({e}); is the env built? "
                f"(`caravela env build {self.built.src}`)"
            ) from e
        return _Worker(index, proc, time.monotonic())

    def _kill(self, w: _Worker) -> None:
        w.kill()
        if self.built.backend == "docker":  # the relay is dead; now the worker in its container
            from reward_envs.containers import kill_slot

            kill_slot(self._slot(w.index))

    def _restart(self, w: _Worker) -> _Worker:
        self._kill(w)
        self.stats["restarts"] += 1
        fresh = self._spawn(w.index)
        fresh.failed_starts = 0 if w.ready else w.failed_starts + 1
        self.workers[w.index] = fresh
        return fresh

    def close(self) -> None:
        """Kill every worker (and remove their containers)."""
        for w in self.workers:
            w.kill()
        if self.built.backend == "docker":
            from reward_envs.containers import remove_slots

            remove_slots([self._slot(w.index) for w in self.workers])
        for log in self._logs:
            log.close()
        self._logs = []

    def counters(self) -> dict[str, int]:
        """``stats`` as a plain dict (callable through a Ray actor handle)."""
        return dict(self.stats)

    def score_counted(self, items: Sequence[Item]) -> tuple[list[RewardResult], dict[str, int]]:
        """``score`` and the counters after it, in one call (one round trip to a Ray actor)."""
        return self.score(items), self.counters()

    def pids(self) -> list[int]:
        """Worker process ids (for tests and monitoring)."""
        return [w.pid for w in self.workers]

    def pid(self) -> int:
        """This pool's own process id (a Ray actor's, for tests and monitoring)."""
        return os.getpid()

    # -- scoring -----------------------------------------------------------------------------
    def score(self, items: Sequence[Item]) -> list[RewardResult]:
        """One result per item, in order; see the module doc for what can go wrong."""
        for i, it in enumerate(items):
            try:
                json.dumps(it.fields, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"item {i} for env {self.manifest.name!r}: fields must be JSON ({e})"
                ) from None
        chunk = 1 if self.manifest.api == "score" else self.manifest.batch_size
        queue = deque(
            self._job(list(range(s, min(s + chunk, len(items)))))
            for s in range(0, len(items), chunk)
        )
        self._items, self._results, self._queue = items, {}, queue
        try:
            self._run()
            results = self._results
        finally:
            self._items, self._results, self._queue = [], {}, deque()
        self.stats["items"] += len(items)
        assert len(results) == len(items)
        return [results[i] for i in range(len(items))]

    def _job(self, indices: list[int], crashes: int = 0) -> _Job:
        self._seq += 1
        return _Job(self._seq, indices, crashes)

    def _run(self) -> None:
        queue = self._queue
        while True:
            for w in list(self.workers):
                if w.ready and w.job is None and queue:
                    self._assign(w, queue.popleft())
            waiting = [w for w in self.workers if not w.ready or w.job is not None]
            if (
                not queue
                and all(w.ready for w in self.workers)
                and not any(w.job for w in self.workers)
            ):
                return
            now = time.monotonic()
            wait = min(self._deadline(w) for w in waiting) - now
            readable, _, _ = select.select([w.fd for w in waiting], [], [], max(0.0, wait))
            for w in waiting:
                if w.fd in readable:
                    self._read(w)
            now = time.monotonic()
            for w in list(self.workers):
                if (not w.ready or w.job is not None) and now > self._deadline(w):
                    self._expired(w)

    def _deadline(self, w: _Worker) -> float:
        return w.deadline if w.ready else w.started + self.startup_timeout_s

    def _assign(self, w: _Worker, job: _Job) -> None:
        w.job = job
        w.deadline = time.monotonic() + self.timeout_s * len(job.indices)
        assert w.proc.stdin is not None
        try:
            w.proc.stdin.write(encode(ScoreRequest(job.seq, [self._items[i] for i in job.indices])))
            w.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._lost(w, "crash", "worker pipe closed")

    def _read(self, w: _Worker) -> None:
        lines = w.lines()
        if lines is None:
            if not w.ready and w.failed_starts >= MAX_FAILED_STARTS - 1:
                self._failed_start(w, f"exited with code {w.proc.wait()} before saying hello")
            self._lost(w, "crash", f"worker exited (code {w.proc.wait()})")
            return
        for line in lines:
            try:
                msg = decode(line)
            except ProtocolError as e:
                self._lost(w, "protocol", f"protocol error: {e}")
                return
            if isinstance(msg, Hello):
                if msg.error or msg.protocol != PROTOCOL_VERSION:
                    self._failed_start(w, msg.error or f"protocol {msg.protocol}")
                w.ready = True
            elif isinstance(msg, ScoreReply) and w.job is not None and msg.seq == w.job.seq:
                if len(msg.results) != len(w.job.indices):
                    self._lost(w, "protocol", "reply has the wrong length")
                    return
                for i, r in zip(w.job.indices, msg.results, strict=True):
                    self._results[i] = self._result(r, w)
                w.job = None
            else:
                self._lost(w, "protocol", f"unexpected {type(msg).__name__}")
                return

    def _expired(self, w: _Worker) -> None:
        if not w.ready:
            self._failed_start(w, f"did not start within {self.startup_timeout_s:.0f} s")
        self._lost(w, "timeout", f"timed out after {self.timeout_s:g} s")

    def _failed_start(self, w: _Worker, why: str) -> None:
        self._kill(w)
        raise EnvStartError(
            f"env {self.manifest.name!r}: worker {w.index} {why}; see its log in "
            f"{self.log_dir or '(no log dir)'} and check `caravela env test` on the env"
        )

    def _lost(self, w: _Worker, kind: ErrorKind, why: str) -> None:
        """The worker is gone or unusable: restart it and settle its job."""
        job, name = w.job, w.name
        self._restart(w)
        if job is None:
            return
        if len(job.indices) > 1 and kind in ("timeout", "crash"):
            self._queue.extendleft(self._job([i]) for i in reversed(job.indices))  # one by one
        elif kind == "crash" and job.crashes == 0:
            self._queue.appendleft(self._job(job.indices, crashes=1))
        else:
            for i in job.indices:
                self._results[i] = self._result(ItemResult(None, why, kind), None, name)

    def _result(self, r: ItemResult, w: _Worker | None, name: str = "") -> RewardResult:
        if r.error is not None:
            self.stats["errors"] += 1
            self.stats[f"errors/{r.error_kind}"] += 1
        else:
            self.stats["scored"] += 1
        return RewardResult(
            score=r.score,
            error=r.error,
            error_kind=r.error_kind,
            info=r.info,
            env=self.manifest.name,
            build_hash=self.built.build_hash,
            worker=w.name if w is not None else name,
        )
