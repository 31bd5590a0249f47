"""Two gloo ranks (real torch.distributed processes) make exactly the single-process update,
with the model replicated or sharded with FSDP2 (``fully_shard``, on CPU with gloo), with one
or two optimizer updates per batch."""

import copy
import random

import pytest
import torch
import torch.multiprocessing as mp

from trainer.config import TrainerConfig
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer, shard


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).float()


def make_batch(n=11):
    rng = random.Random(0)
    samples = [
        TrainSample(
            sample_id=str(i),
            prompt_ids=[1] + [rng.randrange(3, 64) for _ in range(rng.randrange(2, 6))],
            completion_ids=[rng.randrange(3, 64) for _ in range(rng.randrange(1, 20))],
            advantage=rng.uniform(-1, 1),
        )
        for i in range(n)
    ]
    return TrainBatch(step=0, samples=samples, max_completion_length=20)


def cfg(loss, sharding="replicate", mu=1):
    return TrainerConfig(
        lr=1e-2,
        loss={"type": loss},
        sharding=sharding,
        updates_per_batch=mu,
        max_tokens_per_micro_batch=48,
        pack_row_tokens=48,
        logprob_chunk_size=16,
    )


def leave(queue):
    """End a spawned gloo rank: destroy its group, flush ``queue``, and exit without
    interpreter finalization. Gloo's worker threads outlive ``destroy_process_group`` holding
    async work (FSDP2's reduce-scatters) with tensors in it; freeing those while the
    interpreter is torn down takes the GIL and aborts now and then (SIGABRT, "terminate
    called without an active exception": pytorch/pytorch#179291, #190489). A failure before
    this point still exits non-zero."""
    import os

    import torch.distributed as dist

    dist.destroy_process_group()
    queue.close()
    queue.join_thread()
    os._exit(0)


def _rank(rank, world, port, loss, sharding, mu, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    trainer = Trainer(make_model(), cfg(loss, sharding, mu))
    assert trainer.sharded == (sharding == "fsdp2")
    metrics = [trainer.train_step(make_batch()) for _ in range(2)]
    # whole weights, gathered from the shards; numpy, not tensors: torch would pass
    # shared-memory handles that die with this process
    state = {k: v.detach().numpy().copy() for k, v in trainer.state_dict().items()}
    saved = copy.deepcopy(trainer.checkpoint())  # this rank's share; a copy, not the live one
    third = trainer.train_step(make_batch(5))
    resumed = Trainer(make_model(), cfg(loss, sharding, mu))
    resumed.restore(saved)
    assert resumed.train_step(make_batch(5))["loss"] == pytest.approx(third["loss"], rel=1e-6)
    for k, v in resumed.state_dict().items():  # the restored optimizer made the same step
        assert torch.allclose(v, trainer.state_dict()[k], atol=1e-6), k
    # one sample: rank 1 has none, yet takes part in every collective (FSDP2: idle passes)
    lone = make_batch(1)
    assert trainer.train_step(lone)["tokens"] == sum(mb.real_tokens for mb in trainer.layout(lone))
    if rank == 0:
        queue.put((state, metrics))
    leave(queue)


@pytest.mark.parametrize(
    "loss,sharding,mu",
    [
        ("grpo", "replicate", 1),
        ("dr_grpo", "replicate", 1),
        ("gspo", "replicate", 1),
        ("grpo", "fsdp2", 1),
        ("dapo", "replicate", 2),
        ("grpo", "fsdp2", 2),
    ],
)
def test_two_ranks_equal_one_process(loss, sharding, mu):
    model = make_model()
    single = Trainer(model, cfg(loss, mu=mu))
    expected = [single.train_step(make_batch()) for _ in range(2)]

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + random.randrange(1000)
    args = (2, port, loss, sharding, mu, queue)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    state, metrics = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # weights after two AdamW steps (lr 1e-2) agree to float summation-order noise (~2e-6);
    # Adam hides a gradient scale error, so the pre-clip gradient norm is compared too
    for name, t in model.state_dict().items():
        assert torch.allclose(torch.from_numpy(state[name]), t, atol=1e-5), name
    for got, want in zip(metrics, expected, strict=True):
        for k in ("loss", "grad_norm", "tokens", "clip/frac"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_shards_cover_every_sample_once_balanced_by_tokens():
    lengths = [random.Random(i).randrange(1, 100) for i in range(101)]
    parts = [shard(lengths, r, 4) for r in range(4)]
    assert sorted(i for p in parts for i in p) == list(range(101))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)
