"""The trainer's part of a run checkpoint: every rank writes its own shard, no rank gathers.

Inside a checkpoint directory (``orchestrator.checkpoint`` creates it and renames it into
place once every rank has returned from ``save``):

- ``trainer/``: model and optimizer state, written with ``torch.distributed.checkpoint``
  (DCP, sharded state dicts from ``get_state_dict``): ``.metadata`` and one
  ``__<rank>_0.distcp`` per rank. Under FSDP2 each rank writes its own shards; with the
  model replicated DCP writes every tensor once, spread over the ranks (not ``world``
  copies). With one rank and no process group it is written alone.
- ``trainer.json`` (rank 0; ``TrainerState``): the policy version and the LR scheduler's
  state, identical on every rank, and the world size and sharding it was written with.
- ``rng/rank-<r>.pt``: each rank's RNG state (CPU, and CUDA's where there is a GPU).

DCP reshards on load, so a checkpoint resumes on any number of ranks and under either
``trainer.sharding``: the step after ``load`` makes the update the uninterrupted run makes
(tests/trainer/test_checkpoint_dcp.py: same world size, 2 -> 1 and 1 -> 2 ranks, replicate
and FSDP2 both ways). RNG: on the same world size every rank gets its own state back; on
another, a rank with no file of its own takes rank 0's (every rank starts from the same
seed, so this is how a run starts too). No rank's stream is exact then, which matters only
to a model that draws random numbers while training (dropout); the models trained here
draw none.

Checkpoints of earlier versions (one ``trainer.pt``, the whole state gathered on rank 0) are
refused with a message, not converted; ``weights`` reads their model (``caravela export``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel

if TYPE_CHECKING:
    from trainer.trainer import Trainer

SHARDS = "trainer"
"""The DCP directory inside a checkpoint."""
STATE = "trainer.json"
RNG = "rng"


class TrainerState(BaseModel):
    """``trainer.json``: what every rank holds alike, written once."""

    version: int
    scheduler: dict[str, Any]
    """``LRScheduler.state_dict()`` (numbers and lists)."""
    world: int
    """Ranks that wrote the checkpoint (for the RNG states and for people)."""
    sharding: str
    """``trainer.sharding`` when written; any setting loads it (DCP reshards)."""


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(trainer: Trainer, path: Path) -> None:
    """Write this rank's part of ``trainer``'s state into the checkpoint directory ``path``.
    Every rank calls it (a collective under a process group); it returns once ``trainer/``
    is complete (DCP's coordinator writes ``.metadata`` after every rank's data, then
    releases the ranks) and this rank's other files are written."""
    path = Path(path)
    with _alone():
        dcp.save(trainer.checkpoint(), checkpoint_id=path / SHARDS, no_dist=_no_dist())
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (path / RNG).mkdir(exist_ok=True)
    torch.save(rng, path / RNG / f"rank-{trainer.rank}.pt")
    if trainer.rank == 0:
        state = TrainerState(
            version=trainer.version,
            scheduler=trainer.scheduler.state_dict(),
            world=trainer.world,
            sharding=trainer.cfg.sharding,
        )
        (path / STATE).write_text(state.model_dump_json())


def load(trainer: Trainer, path: Path) -> int:
    """Restore what ``save`` wrote in ``path`` into ``trainer`` (every rank calls it, on any
    number of ranks, under either sharding); returns the version."""
    path = Path(path)
    if not (path / SHARDS / ".metadata").exists():
        if (path / "trainer.pt").exists():
            raise ValueError(
                f"{path} holds trainer.pt, a whole-state checkpoint written by an earlier "
                "version of Caravela; this one reads sharded checkpoints (trainer/, "
                "torch.distributed.checkpoint) only: resume with the version that wrote it, "
                "or start a new run"
            )
        raise FileNotFoundError(f"{path} holds no trainer checkpoint ({SHARDS}/.metadata)")
    saved = TrainerState.model_validate_json((path / STATE).read_text())
    state = trainer.checkpoint()  # this rank's share, in the layout to load into
    with _alone():
        dcp.load(state, checkpoint_id=path / SHARDS, no_dist=_no_dist())
    trainer.restore(state)
    trainer.scheduler.load_state_dict(saved.scheduler)
    _rates_from_schedule(trainer)
    trainer.version = saved.version
    own = path / RNG / f"rank-{trainer.rank}.pt"
    rng = torch.load(own if own.exists() else path / RNG / "rank-0.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return saved.version


def _rates_from_schedule(trainer: Trainer) -> None:
    """The next update's learning rate from this trainer's schedule at the loaded step: the
    optimizer state holds the rate the saved run's schedule set, which differs when the
    resumed run's length (``steps``) does."""
    sched = trainer.scheduler
    lambdas = zip(sched.base_lrs, sched.lr_lambdas, strict=True)
    rates = [base * f(sched.last_epoch) for base, f in lambdas]
    for group, lr in zip(trainer.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    sched._last_lr = rates


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's whole weights in the checkpoint ``path``, read in this process (no process
    group needed, whatever number of ranks wrote it): ``caravela export``, tests and
    benchmarks. Also reads the whole-state ``trainer.pt`` of earlier versions (which
    ``load`` refuses): its ``model`` entry, keyed like the model's own state dict."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    whole = Path(path) / "trainer.pt"
    if not (Path(path) / SHARDS / ".metadata").exists() and whole.exists():
        state = torch.load(whole, map_location="cpu", weights_only=True)
        # under FSDP2 it was gathered from the policy wrapper, whose model is ``.model``
        strip = "model." if state.get("sharding") == "fsdp2" else ""
        return {k.removeprefix(strip): v for k, v in state["model"].items()}
    reader = FileSystemReader(Path(path) / SHARDS)
    meta = reader.read_metadata().state_dict_metadata
    model = {
        k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    with _alone():
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
