"""The three parts the loop is handed (engines, env scorer, trainer group), in one process or
on a Ray cluster.

The loop (``orchestrator.loop``) only ever calls the methods below; ``cluster.mode``
changes which implementation it gets, never the loop:

=============  ======================================  =================================
part           ``cluster.mode = "ray"`` (default)      ``cluster.mode = "local"``
=============  ======================================  =================================
engines        ``EngineRouter`` over engine actors     ``LocalRouter`` over one engine
scorer         ``RayScorer``: pool hosts per node      ``LocalScorer``: a pool per env
trainers       ``TrainerGroup``: ranks as actors       ``LocalTrainerGroup``: one rank
=============  ======================================  =================================

Each engine loads its own copy of the model and gets the trainer's weights after every
optimizer step (``push``), checked by the logprob probe, in both modes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.transfer import TensorMeta
from orchestrator import scoring
from orchestrator.config import RunConfig
from orchestrator.data import read_jsonl
from orchestrator.rollout import Generator, tokenize
from reward_envs.config import EnvSpec
from trainer.protocol import TrainBatch

if TYPE_CHECKING:
    from orchestrator.elastic import EngineRequests, Scaler


class Engines(Generator, Protocol):
    """``inference_server.router.EngineRouter`` (Ray) or ``LocalRouter``."""

    membership: int
    """Changes of the set of serving engines (``EngineRouter.membership``)."""

    def update_weights(
        self, version: int, state: Any, bucket_bytes: int = ...
    ) -> dict[str, float]: ...
    def transfer_size(self) -> int: ...
    def join_transfer(self, address: str, port: int, world: int) -> None: ...
    def receive_weights(
        self, version: int, meta: Sequence[TensorMeta], bucket_bytes: int
    ) -> dict[str, float]: ...
    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float: ...
    def metrics(self) -> dict[str, float]: ...
    def close(self) -> None: ...


class Pending(Protocol):
    """A call under way (a ``concurrent.futures.Future`` or ``trainer.group.Pending``)."""

    def result(self) -> Any: ...


class Scorer(scoring.Scorer, Protocol):
    """``reward_envs.scorer.RayScorer`` or ``LocalScorer``."""

    def add(self, spec: EnvSpec) -> None: ...
    def remove(self, env: str) -> None: ...
    def metrics(self) -> dict[str, float]: ...
    def quarantined(self) -> dict[str, str]: ...
    def close(self) -> None: ...


class Trainers(Protocol):
    """``trainer.group.TrainerGroup`` (Ray) or ``LocalTrainerGroup``."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]: ...
    def host_state(self, names: list[str]) -> Any: ...
    def transfer_address(self) -> tuple[str, int]: ...
    def transfer_meta(self, names: list[str]) -> list[TensorMeta]: ...
    def open_transfer(self, address: str, port: int, world: int) -> Pending: ...
    def send_weights(self, meta: list[TensorMeta], bucket_bytes: int) -> Pending: ...
    def state_dict(self, names: list[str]) -> dict[str, Any]: ...
    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> int: ...
    def check(self) -> None: ...
    def restart(self) -> None: ...
    def set_version(self, version: int) -> None: ...
    def on_trainer_node(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    @property
    def restarts(self) -> int: ...


@dataclass
class Parts:
    """What the loop drives, and the probe that checks every weight push."""

    engines: Engines
    scorer: Scorer
    trainers: Trainers
    names: list[str]
    """Tensor names the engines serve (the checkpoint's)."""
    probe: list[list[int]]
    """Fixed token sequences whose logprobs engines and trainer must agree on."""
    probe_tolerance: float
    bucket_bytes: int = 1 << 20
    on_ray: bool = False
    monitors: list[Any] = field(default_factory=list)
    meta: list[TensorMeta] | None = None
    """What a collective push carries (``connect``); None: pushes go through the object
    store (``inference.weight_sync = "object_store"``)."""
    world: int = 0
    """Members of the push group when it was formed (rank 0 + engine workers)."""
    version: int = 0
    """The version the engines serve (the last push)."""
    membership: int = 0
    """The engines' ``membership`` when the push group was formed: a different one now
    means an engine left or a replacement joined, and the group is formed again."""
    scaler: Scaler | None = None
    """Starts engines that join the run and drains those that leave (on Ray only)."""

    def connect(self, bucket_bytes: int) -> None:
        """Form the weight-push group (trainer rank 0 + every engine worker): from now on
        ``push`` broadcasts buckets of ``bucket_bytes`` over it. With no engine in service
        (every one restarting) there is no group: each gets the weights when it is back."""
        address, port = self.trainers.transfer_address()
        self.membership = self.engines.membership
        world = 1 + self.engines.transfer_size()
        if world > 1:
            opening = self.trainers.open_transfer(address, port, world)
            self.engines.join_transfer(address, port, world)
            opening.result()
        self.meta = self.trainers.transfer_meta(self.names)
        self.bucket_bytes = bucket_bytes
        self.world = world

    def push(self, version: int) -> dict[str, float]:
        """The trainer's weights to every engine as ``version``, then the probe."""
        t0 = time.perf_counter()
        try:
            if self.meta is not None:
                metrics = self._broadcast(version)
            else:
                metrics = self.engines.update_weights(
                    version, self.trainers.host_state(self.names), self.bucket_bytes
                )
        except Exception:
            self.trainers.check()  # a dead trainer rank fails the push: TrainerDied
            raise
        self.version = version
        expected = self.trainers.logprobs(self.probe)
        metrics["weight_sync/probe_mean_diff"] = self.engines.probe(
            self.probe, expected, self.probe_tolerance
        )
        metrics["weight_sync/collective"] = float(self.meta is not None)
        metrics["seconds/sync"] = time.perf_counter() - t0
        return metrics

    def restore_engine(self, engine_id: str, handle: Any) -> None:
        """Give a restarted engine (``EngineRouter.restore``) the weights the others serve,
        through the object store (it is not in the push group yet; the next push forms the
        group again with it). Version 0 is the model directory's: it has them already."""
        import ray

        if self.version == 0:
            return
        state = self.trainers.host_state(self.names)
        ray.get(handle.update_weights.remote(self.version, state, self.bucket_bytes))

    def scale(
        self, step: int, requests: EngineRequests | None = None, log: Any = print
    ) -> dict[str, float]:
        """Engines join (a new inference node, or more asked through the run's API) or leave
        (drained through the API), at a point of ``step`` where nothing is in flight
        (``orchestrator.elastic``). A joining engine gets the current weights at once; the
        next push forms the push group again with it."""
        if self.scaler is not None:
            return self.scaler.step(step, self.version, requests, log)
        if requests is not None and any(requests.take()):
            log(f"step {step}: engines neither join nor leave with cluster.mode = 'local'")
        return {}

    def _broadcast(self, version: int) -> dict[str, float]:
        """The collective push: the engines receive while rank 0 broadcasts. When an engine
        left or a replacement joined since the push group formed (``membership``), the
        group is formed again first; an engine that dies during the push fails it (at worst
        after the group's timeout, 120 s), and then the group is formed again and the push
        repeated (an engine that took this version already drops it)."""
        assert self.meta is not None
        regrouped = 0
        for attempt in (0, 1):
            if self.engines.membership != self.membership:  # members left or joined
                self.connect(self.bucket_bytes)
                regrouped += 1
            if self.world == 1:  # every engine is restarting: restore_engine gives them this
                return {"weight_sync/engines": 0.0, "weight_sync/regrouped": float(regrouped)}
            sending = self.trainers.send_weights(self.meta, self.bucket_bytes)
            try:
                metrics = self.engines.receive_weights(version, self.meta, self.bucket_bytes)
                sending.result()
            except Exception:
                with contextlib.suppress(Exception):
                    sending.result()  # the sender ends too (at worst after the group timeout)
                if attempt or self.engines.membership == self.membership:
                    raise  # no member was lost: the failure is the push's own
                continue
            metrics["weight_sync/regrouped"] = float(regrouped)
            return metrics
        raise AssertionError("unreachable")

    def metrics(self) -> dict[str, float]:
        """Engines alive/dead and requests re-queued; per env restarts, errors, replicas;
        trainer group restarts."""
        return {
            **self.engines.metrics(),
            **self.scorer.metrics(),
            "restarts/trainer": float(self.trainers.restarts),
        }

    def close(self) -> None:
        if self.on_ray:
            import ray

            for m in self.monitors:
                ray.kill(m)
        self.scorer.close()
        self.engines.close()


def _probe(cfg: RunConfig, tok: Any) -> tuple[list[str], list[list[int]], float, int]:
    """Tensor names the engines serve, probe sequences and tolerance, push bucket size."""
    from inference_server.weights import PROBE_TOLERANCE, served_shapes

    backend = cfg.inference.backend
    n = cfg.inference.probe_sequences
    tol = cfg.inference.probe_tolerance or PROBE_TOLERANCE[cfg.trainer.dtype]
    bucket = (backend.bucket_mb << 20) if backend.type == "vllm" else 1 << 20
    cache: dict[str, list[int]] = {}
    heldout = read_jsonl(cfg.eval.resolved()[0].file)[:n]  # the first held-out set's
    probe = [tokenize(tok, p, cache, cfg.prompt) for p in heldout]
    return sorted(served_shapes(cfg.model)), probe, tol, bucket


def total_updates(cfg: RunConfig) -> int:
    """The run's optimizer updates, what ``trainer.lr_schedule`` decays over."""
    return cfg.steps * cfg.trainer.updates_per_batch


def local_parts(cfg: RunConfig, tok: Any) -> Parts:
    """One trainer rank, one engine and one pool per env, in this process."""
    from inference_server.actors import start_local_engines
    from inference_server.local_router import LocalRouter
    from reward_envs.scorer import LocalScorer
    from trainer.group import LocalTrainerGroup

    backend = cfg.inference.backend
    trainers = LocalTrainerGroup(cfg.model, cfg.trainer, total_updates(cfg))
    engines = LocalRouter(
        start_local_engines(backend, cfg.model, cfg.trainer.dtype, cfg.seed),
        cfg.inference.calls_per_engine,
    )
    try:
        scorer = LocalScorer(cfg.envs, log_dir=Path(cfg.output_dir) / "envs")
    except BaseException:
        engines.close()
        raise
    parts = Parts(engines, scorer, trainers, *_probe(cfg, tok))
    return _connected(parts, cfg)


def _connected(parts: Parts, cfg: RunConfig) -> Parts:
    """``parts`` with the weight-push group formed when ``inference.weight_sync`` is
    ``collective``; closed if that fails."""
    if cfg.inference.weight_sync == "collective":
        try:
            parts.connect(cfg.inference.transfer_bucket_mb << 20)
        except BaseException:
            parts.close()
            raise
    return parts


def ray_parts(cfg: RunConfig, tok: Any) -> Parts:
    """Trainer ranks, engines and env pools as actors on the Ray cluster this process is
    connected to, placed by node role."""
    from inference_server.actors import engine_spawner
    from inference_server.router import EngineRouter
    from orchestrator.elastic import Scaler
    from orchestrator.monitor import start_gpu_monitors
    from reward_envs.scorer import RayScorer
    from trainer.group import TrainerGroup

    backend = cfg.inference.backend
    trainers = TrainerGroup(cfg.model, cfg.trainer, total_updates(cfg))
    spawner = engine_spawner(backend, cfg.model, cfg.trainer.dtype, cfg.seed)
    engines = EngineRouter(spawner.start(), spawner, cfg.inference)  # restarts dead engines
    scorer = RayScorer(cfg.envs, log_dir=Path(cfg.output_dir) / "envs")
    parts = Parts(engines, scorer, trainers, *_probe(cfg, tok), on_ray=True)
    engines.restore = parts.restore_engine
    parts.scaler = Scaler(engines, spawner)
    parts.monitors = start_gpu_monitors()
    return _connected(parts, cfg)


@contextmanager
def open_parts(cfg: RunConfig, tok: Any, log: Any = print) -> Iterator[Parts]:
    """The run's parts as ``cluster.mode`` says; stopped on the way out. On Ray: the cluster
    this process is already connected to (left running), else one this joins or starts (and
    leaves)."""
    owned = False
    if cfg.cluster.mode == "local":
        parts = local_parts(cfg, tok)
    else:
        import ray

        owned = not ray.is_initialized()
        if owned:
            _start_ray(cfg, log)
        try:
            parts = ray_parts(cfg, tok)
        except BaseException:
            if owned:
                ray.shutdown()
            raise
    try:
        yield parts
    finally:
        parts.close()
        if owned:
            import ray

            ray.shutdown()


def _start_ray(cfg: RunConfig, log: Any) -> None:
    """Join ``cluster.address``, or start a private local cluster with both node roles."""
    from orchestrator.cluster import connect, start_local

    c = cfg.cluster
    if c.address:
        if c.token_path is None:
            raise ValueError("cluster.address needs cluster.token_path (the cluster's token)")
        connect(c.address, c.token_path, log=log)
    else:
        start_local(
            Path(cfg.output_dir),
            num_cpus=c.num_cpus or 4 * (os.cpu_count() or 1),
            resources={"inference_node": 1, "trainer_node": 1},
            allow_network=c.allow_network,
            log=log,
        )
