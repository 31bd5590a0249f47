"""Sharded checkpoints (``trainer.checkpoint``, torch.distributed.checkpoint) with real gloo
ranks: every rank writes its own shard, and a checkpoint resumes exactly on as many ranks,
on fewer (2 -> 1) and on more (1 -> 2), replicated or FSDP2-sharded, and under the other
sharding. Exactly: the step after the load gives the weights the uninterrupted run's next
step gives; bit for bit on as many ranks, to float summation order (measured below 1e-6)
across world sizes and shardings."""

import math
import random
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.trainer.test_data_parallel import cfg, leave, make_batch, make_model
from trainer import checkpoint
from trainer.trainer import Trainer

OTHER = {"replicate": "fsdp2", "fsdp2": "replicate"}


def trainer(sharding):
    """A trainer whose scheduler is mid-warmup (its state matters) after two steps."""
    t = Trainer(make_model(), cfg("grpo", sharding).model_copy(update={"warmup_steps": 4}))
    for n in (11, 7):
        t.train_step(make_batch(n))
    return t


def next_step(t):
    """The weights after one more step (whole; a collective under FSDP2), as numpy arrays:
    torch would pass shared-memory handles that die with the process."""
    t.train_step(make_batch(5))
    return {k: v.detach().numpy().copy() for k, v in t.state_dict().items()}


def resumed(sharding, path):
    t = Trainer(make_model(), cfg("grpo", sharding).model_copy(update={"warmup_steps": 4}))
    assert checkpoint.load(t, path) == 2
    return t


def _two_ranks(rank, port, sharding, root, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    run = trainer(sharding)
    checkpoint.save(run, root / "two")
    out = {"continued": next_step(run)}
    out["2->2"] = next_step(resumed(sharding, root / "two"))
    out["2->2, other sharding"] = next_step(resumed(OTHER[sharding], root / "two"))
    out["1->2"] = next_step(resumed(sharding, root / "one"))
    if rank == 0:
        queue.put(out)
    leave(queue)


def tensor_bytes(path):
    """Bytes of tensor data in each file of a DCP directory (per-item headers left out)."""
    meta = FileSystemReader(path).read_metadata()
    out: Counter[str] = Counter()
    for index, info in meta.storage_data.items():
        m = meta.state_dict_metadata[index.fqn]
        if isinstance(m, TensorStorageMetadata):
            chunk = next(c for c in m.chunks if list(c.offsets) == list(index.offset))
            out[info.relative_path] += math.prod(chunk.sizes) * m.properties.dtype.itemsize
    return out


def max_diff(a, b):
    return max(float(abs(torch.from_numpy(a[k]) - torch.from_numpy(b[k])).max()) for k in a)


@pytest.mark.parametrize("sharding", ["replicate", "fsdp2"])
def test_resume_is_exact_on_one_or_two_ranks(tmp_path, sharding):
    one = trainer(sharding)  # no process group: the LocalTrainerGroup's rank
    checkpoint.save(one, tmp_path / "one")
    saved = {k: v.clone() for k, v in one.state_dict().items()}
    rng = torch.get_rng_state()
    continued_alone = next_step(one)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + random.randrange(1000)
    procs = [
        ctx.Process(target=_two_ranks, args=(r, port, sharding, tmp_path, queue)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    two = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    # bit for bit on as many ranks (the sharding the run had)
    again = resumed(sharding, tmp_path / "one")
    assert torch.equal(torch.get_rng_state(), rng)  # not the seed Trainer() set
    assert max_diff(next_step(again), continued_alone) == 0.0
    assert max_diff(two["2->2"], two["continued"]) == 0.0
    # across world sizes and shardings the sums run in another order: a few float32 ulps
    assert max_diff(next_step(resumed(sharding, tmp_path / "two")), two["continued"]) < 1e-6
    assert max_diff(two["1->2"], continued_alone) < 1e-6
    assert max_diff(two["2->2, other sharding"], two["continued"]) < 1e-6

    # per-rank shards: each rank wrote part of one copy (replicated tensors once), not a copy
    shards = tmp_path / "two" / "trainer"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    written, whole = tensor_bytes(shards), tensor_bytes(tmp_path / "one" / "trainer")
    assert sum(written.values()) == sum(whole.values())
    assert min(written.values()) > 0.25 * sum(whole.values()), written
    assert sorted(p.name for p in (tmp_path / "two" / "rng").iterdir()) == [
        "rank-0.pt",
        "rank-1.pt",
    ]
    # and the whole weights read back in one process
    got = checkpoint.weights(tmp_path / "one")
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def test_a_trainer_pt_checkpoint_is_refused_saying_why(tmp_path):
    (tmp_path / "trainer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="earlier version of Caravela"):
        checkpoint.load(Trainer(make_model(), cfg("grpo")), tmp_path)
