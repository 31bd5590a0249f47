"""The trainer group: data-parallel ranks as Ray actors on the trainer nodes, or one rank in
the driver's process.

``TrainerRank`` is a plain class (one rank: model, ``Trainer``, membership of the
``torch.distributed`` group: gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPU); ``TrainerGroup``
makes it a Ray actor in one place, ``ranks_per_node`` per node offering the
``trainer_node`` resource (never placed by hostname), joins the ranks and fans
calls out. Every rank gets the whole batch (put in Ray's object store once) and trains its
share (``Trainer``). The weights reach the engines one of two ways
(``inference.weight_sync``): rank 0 broadcasts them in buckets over a weight-push group of
its own with every engine worker (``common.transfer``; under FSDP2 every rank gathers each
tensor in turn), or rank 0 exports a ``HostState`` that stays in Ray's object store (the
engines fetch it from there, not through the driver). ``LocalTrainerGroup`` is the same
interface over one ``TrainerRank`` in this process (``cluster.mode = "local"``): no process
group of ranks; the push runs on a thread while the engine receives on another.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from common.transfer import TensorMeta, TransferGroup
from common.weights import HostState, weights_checksum
from trainer.config import TrainerConfig
from trainer.logprobs import sequence_logprobs
from trainer.protocol import TrainBatch

TRAINER_RESOURCE = "trainer_node"


class TrainerDied(RuntimeError):
    """A trainer rank's process died (or Ray lost it): the group must be formed again
    (``TrainerGroup.restart``) and the run continued from its last checkpoint."""


def wait_ranks(refs: list[Any]) -> list[Any]:
    """The answers of calls on ranks, in order. A rank that died raises ``TrainerDied`` as
    soon as Ray notices, instead of waiting for the others, which would hang in a collective
    with it (gloo's timeout is 30 minutes)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)
        except (ActorDiedError, ActorUnavailableError) as e:
            raise TrainerDied(f"a trainer rank died: {str(e).splitlines()[0][:300]}") from e
    return list(ray.get(refs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class TrainerRank:
    """One data-parallel rank."""

    def __init__(
        self,
        model_dir: Path,
        cfg: TrainerConfig,
        rank: int,
        world: int,
        total_updates: int | None = None,
    ) -> None:
        """``total_updates``: the run's optimizer updates, what the learning rate decays
        over (``Trainer``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, int(cfg.cpus_per_rank)))
        self.cfg, self.rank, self.world = cfg, rank, world
        self.total_updates = total_updates
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=getattr(torch, cfg.master_dtype),  # parameters; cfg.dtype is the compute dtype
            attn_implementation=cfg.attn_implementation,
        )
        self.model = model.to("cuda") if torch.cuda.is_available() else model
        self.critic: Any = None
        """PPO's critic LM when ``trainer.loss.critic_model`` names one (else the Trainer
        copies the policy's)."""
        critic_dir = getattr(cfg.loss, "critic_model", None)
        if critic_dir is not None:
            critic: Any = AutoModelForCausalLM.from_pretrained(
                critic_dir,
                dtype=getattr(torch, cfg.master_dtype),
                attn_implementation=cfg.attn_implementation,
            )
            self.critic = critic.to("cuda") if torch.cuda.is_available() else critic
        self.trainer: Any = None
        self.transfer: Any = None

    def rendezvous(self) -> tuple[str, int]:
        """Address and a free port on this rank's node (asked of rank 0)."""
        try:
            import ray

            address = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        except ImportError:
            address = "127.0.0.1"
        return address, _free_port()

    def join(self, address: str, port: int) -> int:
        """Join the process group, then build the trainer (which sees the group)."""
        import torch.distributed as dist

        from trainer.trainer import Trainer

        # one group for both kinds of tensors: gradients on the GPU (NCCL), metrics and
        # counts on the CPU (gloo); plain "nccl" has no CPU backend
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world
        )
        self.trainer = Trainer(
            self.model, self.cfg, self.tok.pad_token_id, self.total_updates, self.critic
        )
        return self.rank

    def alone(self) -> int:
        """Build the trainer without a process group (the only rank, in the driver)."""
        from trainer.trainer import Trainer

        self.trainer = Trainer(
            self.model, self.cfg, self.tok.pad_token_id, self.total_updates, self.critic
        )
        return self.rank

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return dict(self.trainer.train_step(batch))

    def save(self, path: str) -> None:
        """This rank's shard of model and optimizer, and its RNG state, into the checkpoint
        directory ``path`` (rank 0 adds scheduler and version; ``trainer.checkpoint``). Every
        rank calls it: a collective."""
        from trainer import checkpoint

        checkpoint.save(self.trainer, Path(path))

    def load(self, path: str) -> int:
        """Restore the checkpoint directory ``path`` (written on any number of ranks, under
        either sharding); returns the version."""
        from trainer import checkpoint

        return checkpoint.load(self.trainer, Path(path))

    def host_state(self, names: list[str]) -> HostState | None:
        """The weights engines serve (``names``), as numpy arrays for the object store (rank
        0; under FSDP2 every rank takes part in gathering them)."""
        state = self.trainer.state_dict()
        return HostState.of({n: state[n] for n in names}) if self.rank == 0 else None

    def checksum(self) -> str:
        return weights_checksum(self.trainer.state_dict())

    # -- the collective weight push (common.transfer) ----------------------------------------
    def _served(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors ``names``, whole, one at a time (under FSDP2 each is gathered when
        its turn comes, a collective of every rank: never the whole model at once)."""
        from torch.distributed.tensor import DTensor

        state = self.trainer.model.state_dict()
        for n in names:
            t = state[n]
            yield n, t.full_tensor() if isinstance(t, DTensor) else t

    def transfer_meta(self, names: list[str]) -> list[TensorMeta]:
        """What a push of ``names`` carries: global shapes, in the engines' dtype."""
        state = self.trainer.model.state_dict()
        return [TensorMeta.of(n, state[n], getattr(torch, self.cfg.dtype)) for n in names]

    def transfer_address(self) -> tuple[str, int]:
        """Where the weight-push group meets: this rank's node and a free port."""
        return self.rendezvous()

    def open_transfer(self, address: str, port: int, world: int) -> None:
        """Rank 0 opens the weight-push group as its sender, on its model's device (blocks
        until every engine worker has joined)."""
        if self.rank == 0:
            # formed again after an engine died: the old group is dropped, not shut down
            self.transfer = TransferGroup(address, port, 0, world, str(self.model.device))

    def send_weights(self, meta: list[TensorMeta], bucket_bytes: int) -> int:
        """Broadcast the served weights to the engine workers (rank 0); under FSDP2 every
        rank must call it, to take part in gathering each tensor. Returns buckets sent."""
        tensors = self._served([m.name for m in meta])
        if self.rank != 0:
            for _ in tensors:  # the gathers rank 0's send needs
                pass
            return 0
        return self.transfer.send(tensors, meta, bucket_bytes)

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs (after the first token) of fixed sequences: the probe's truth."""
        return sequence_logprobs(self.trainer.policy, sequences, self.cfg.logprob_chunk_size)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        import os

        return os.getpid()

    def set_version(self, version: int) -> None:
        """Number the policy ``version`` from now on (after a restart from a checkpoint the
        engines already serve later versions; theirs must keep increasing)."""
        self.trainer.version = version

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in this rank's process, where torch and the model's libraries are
        already imported (the run's final export: no new worker process to start)."""
        return fn(*args)


class TrainerGroup:
    """``ranks_per_node`` ranks on every trainer node, joined into one process group."""

    def __init__(
        self, model_dir: Path, cfg: TrainerConfig, total_updates: int | None = None
    ) -> None:
        """``total_updates``: the run's optimizer updates (``TrainerRank``)."""
        self.args = (Path(model_dir), cfg, total_updates)
        self._order = threading.Lock()
        """Held while calls go out to several ranks: every rank then runs calls made from
        different driver threads (the loop, a rollout restoring an engine) in one order, as
        collectives need."""
        self.restarts = 0
        """Times the ranks were formed again after one died."""
        self.ranks: list[Any] = []
        self._start()

    def _start(self) -> None:
        """Start the rank actors and join them into a new process group."""
        import ray

        model_dir, cfg, total_updates = self.args
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(TRAINER_RESOURCE)]
        if not nodes:
            raise RuntimeError(
                f"no Ray node offers the {TRAINER_RESOURCE!r} resource, so the trainer group "
                f"has nowhere to run; start trainer nodes with `ray start ... --resources "
                f"'{{\"{TRAINER_RESOURCE}\": 1}}'` (the SLURM launcher does)"
            )
        world = len(nodes) * cfg.ranks_per_node
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        actor = ray.remote(
            num_cpus=cfg.cpus_per_rank,
            num_gpus=gpus,
            # the ranks take 90% of a node's trainer_node resource together; env pool actors
            # (1e-3 each) share the rest, so both land on the same nodes
            resources={TRAINER_RESOURCE: 0.9 / cfg.ranks_per_node},
        )(TrainerRank)
        self.ranks = [actor.remote(model_dir, cfg, r, world, total_updates) for r in range(world)]
        address, port = wait_ranks([self.ranks[0].rendezvous.remote()])[0]
        wait_ranks([r.join.remote(address, port) for r in self.ranks])
        self.world = world
        self.sharded = cfg.sharding == "fsdp2" and world > 1
        """FSDP2: gathering weights (push, probe, save) is a collective of every rank."""

    def restart(self) -> None:
        """Stop every rank (the live ones are stuck in a collective with the dead one) and
        form the group again from fresh processes, with the model's initial weights: the
        caller loads a checkpoint next."""
        import ray

        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.restarts += 1
        self._start()

    def pids(self) -> list[int]:
        """The ranks' process ids (chaos tests, monitoring); raises ``TrainerDied`` if one
        is dead: what ``check`` asks after a failed call, to tell whose failure it was."""
        return wait_ranks([r.pid.remote() for r in self.ranks])

    def check(self) -> None:
        """Raise ``TrainerDied`` if a rank is dead (a cheap call to each)."""
        self.pids()

    def set_version(self, version: int) -> None:
        wait_ranks(self._call("set_version", version))

    def on_trainer_node(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a trainer node, and its result: in rank 0's process
        (``TrainerRank.call``: no worker process to start), or, if rank 0 has died (a rank may
        die at any time, the end of the run included), in a fresh Ray task there."""
        try:
            return wait_ranks(self._call("call", fn, *args, ranks=self.ranks[:1]))[0]
        except TrainerDied:
            import ray

            # no CPU asked: the live ranks and the pool hosts may hold every CPU of the node
            task = ray.remote(num_cpus=0, resources={TRAINER_RESOURCE: 1e-3})(fn)
            return ray.get(task.remote(*args))

    def _call(self, method: str, *args: Any, ranks: list[Any] | None = None) -> list[Any]:
        """Object refs of ``method(*args)`` on ``ranks`` (all), sent in one order."""
        with self._order:
            return [getattr(r, method).remote(*args) for r in (ranks or self.ranks)]

    def _collective(self, method: str, *args: Any) -> Any:
        """Rank 0's answer (an object ref); every rank is called when the state is sharded."""
        return self._call(method, *args, ranks=None if self.sharded else self.ranks[:1])[0]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        import ray

        shared = ray.put(batch)  # once in the object store, not pickled once per rank
        return wait_ranks(self._call("train_step", shared))[0]

    # -- the collective weight push (common.transfer) ----------------------------------------
    def transfer_address(self) -> tuple[str, int]:
        address, port = wait_ranks([self.ranks[0].transfer_address.remote()])[0]
        return address, port

    def transfer_meta(self, names: list[str]) -> list[TensorMeta]:
        return wait_ranks([self.ranks[0].transfer_meta.remote(names)])[0]

    def open_transfer(self, address: str, port: int, world: int) -> Pending:
        """Rank 0 opens the weight-push group; returns at once (the group forms when every
        engine worker has joined: ``result()`` waits for that)."""
        return Pending([self.ranks[0].open_transfer.remote(address, port, world)])

    def send_weights(self, meta: list[TensorMeta], bucket_bytes: int) -> Pending:
        """Start broadcasting the weights (every rank under FSDP2: each tensor is gathered
        in turn); ``result()`` waits for the last bucket."""
        ranks = self.ranks if self.sharded else self.ranks[:1]
        return Pending(self._call("send_weights", meta, bucket_bytes, ranks=ranks))

    def host_state(self, names: list[str]) -> Any:
        """An object ref to rank 0's weights (kept in the object store)."""
        return self._collective("host_state", names)

    def state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Rank 0's weights ``names``, here (the driver's final evaluation)."""
        state: HostState = wait_ranks([self.host_state(names)])[0]
        return state.tensors()

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return wait_ranks([self._collective("logprobs", sequences)])[0]

    def save(self, path: Path) -> None:
        """Every rank writes its shard into the checkpoint directory ``path`` (the run
        directory is shared); returns once all of them have finished."""
        wait_ranks(self._call("save", str(path)))

    def load(self, path: Path) -> int:
        return wait_ranks(self._call("load", str(path)))[0]

    def checksums(self) -> list[str]:
        return wait_ranks([r.checksum.remote() for r in self.ranks])

    def nodes(self) -> list[str]:
        return wait_ranks([r.node.remote() for r in self.ranks])


class Pending:
    """Calls under way on some ranks; ``result()`` waits for them and gives rank 0's answer."""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs

    def result(self) -> Any:
        return wait_ranks(self.refs)[0]


class LocalTrainerGroup:
    """The ``TrainerGroup`` interface over one rank in this process."""

    def __init__(
        self, model_dir: Path, cfg: TrainerConfig, total_updates: int | None = None
    ) -> None:
        self.rank = TrainerRank(Path(model_dir), cfg, 0, 1, total_updates)
        self.rank.alone()
        self.world = 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weight-push")

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.rank.train_step(batch)

    def transfer_address(self) -> tuple[str, int]:
        return self.rank.transfer_address()

    def transfer_meta(self, names: list[str]) -> list[TensorMeta]:
        return self.rank.transfer_meta(names)

    def open_transfer(self, address: str, port: int, world: int) -> Future[None]:
        """Open the weight-push group on a thread (the engines join from this process)."""
        return self._pool.submit(self.rank.open_transfer, address, port, world)

    def send_weights(self, meta: list[TensorMeta], bucket_bytes: int) -> Future[int]:
        """Broadcast on a thread, while the engines receive on theirs."""
        return self._pool.submit(self.rank.send_weights, meta, bucket_bytes)

    def host_state(self, names: list[str]) -> HostState:
        """The weights engines serve, handed over as they are (no copy until loaded)."""
        state = self.rank.host_state(names)
        assert state is not None  # rank 0
        return state

    def state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self.host_state(names).tensors()

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.rank.logprobs(sequences)

    def on_trainer_node(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` here: the one rank is this process."""
        return fn(*args)

    def save(self, path: Path) -> None:
        self.rank.save(str(path))

    def load(self, path: Path) -> int:
        return self.rank.load(str(path))

    def checksums(self) -> list[str]:
        return [self.rank.checksum()]

    def check(self) -> None:
        """The one rank is this process: alive while anyone can ask."""

    restarts = 0
    """Never formed again: the rank is this process (``TrainerDied`` is Ray's)."""

    def restart(self) -> None:
        raise RuntimeError("the local trainer rank is this process; it cannot be restarted")

    def set_version(self, version: int) -> None:
        self.rank.set_version(version)
