"""DPO's training step (trainer/preference.py): its gradient is the DPO loss's, it raises the
chosen completion over the rejected one, and two gloo ranks (real torch.distributed
processes, replicated or FSDP2) make the single-process update."""

import copy
import random

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer.test_data_parallel import leave, make_model
from trainer.config import TrainerConfig
from trainer.dpo import DPOInputs, DPOParams, dpo_loss
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer


def make_pairs(n: int = 5, seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    samples = []
    for p in range(n):
        prompt = [1] + [rng.randrange(3, 64) for _ in range(rng.randrange(2, 6))]
        for chosen in (True, False):
            samples.append(
                TrainSample(
                    sample_id=f"{p}/{int(chosen)}",
                    prompt_ids=prompt,
                    completion_ids=[rng.randrange(3, 64) for _ in range(rng.randrange(1, 12))],
                    advantage=0.0,
                    reward=1.0 if chosen else 0.0,
                    pair=p,
                    chosen=chosen,
                )
            )
    rng.shuffle(samples)  # pairs are found by id, not by position
    return TrainBatch(step=0, samples=samples, max_completion_length=12)


def cfg(variant="sigmoid", sharding="replicate", mu=1, **kw):
    return TrainerConfig(
        lr=1e-2,
        loss={"type": "dpo", "variant": variant, "beta": 0.5},
        sharding=sharding,
        updates_per_batch=mu,
        max_tokens_per_micro_batch=32,  # several micro-batches: pairs split across them
        pack_row_tokens=32,
        logprob_chunk_size=16,
        **kw,
    )


def seq_logprob(model, s: TrainSample) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
    lp = torch.log_softmax(logits.float(), -1)
    return lp.gather(1, torch.tensor(s.completion_ids)[:, None]).sum()


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge"])
def test_gradient_is_the_dpo_loss_gradient(variant):
    """After one step on the reference itself (so the margin is 0), and after a second step
    (margins non-zero), the gradient the trainer applied equals that of the DPO loss computed
    directly with autograd through whole-sequence forwards."""
    model = make_model()
    reference = copy.deepcopy(model)
    trainer = Trainer(model, cfg(variant, max_grad_norm=1e9))
    batch = make_pairs()
    for step in range(2):
        twin = copy.deepcopy(model)
        metrics = trainer.train_step(batch)
        pairs = batch.pairs()
        side = [[batch.samples[c] for c, _ in pairs], [batch.samples[r] for _, r in pairs]]
        lp = [torch.stack([seq_logprob(twin, s) for s in ss]) for ss in side]
        with torch.no_grad():
            ref = [torch.stack([seq_logprob(reference, s) for s in ss]) for ss in side]
        n = [torch.tensor([len(s.completion_ids) for s in ss]) for ss in side]
        loss, _ = dpo_loss(
            variant,
            DPOInputs(lp[0], lp[1], ref[0], ref[1], n[0], n[1], len(pairs)),
            DPOParams(beta=0.5),
        )
        loss.backward()
        assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
        assert metrics["pairs"] == 5 and metrics["micro_batches"] > 1
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), (step, name)


def test_dpo_raises_chosen_over_rejected():
    model = make_model()
    trainer = Trainer(model, cfg())
    batch = make_pairs()
    history = [trainer.train_step(batch) for _ in range(8)]
    assert history[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    assert history[-1]["dpo/margin"] > 0.5 and history[-1]["dpo/accuracy"] == 1.0
    assert trainer.version == 8


def test_a_dpo_trainer_refuses_a_batch_without_pairs():
    trainer = Trainer(make_model(), cfg())
    s = TrainSample(sample_id="a", prompt_ids=[1], completion_ids=[3], advantage=1.0)
    with pytest.raises(ValueError, match="algorithm = 'dpo'"):
        trainer.train_step(TrainBatch(step=0, samples=[s], max_completion_length=1))


def test_a_pair_needs_one_chosen_and_one_rejected():
    a = TrainSample(
        sample_id="a", prompt_ids=[1], completion_ids=[3], advantage=0.0, pair=0, chosen=True
    )
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        TrainBatch(
            step=0, samples=[a, a.model_copy(update={"sample_id": "b"})], max_completion_length=1
        )


def _rank(rank, world, port, sharding, mu, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    trainer = Trainer(make_model(), cfg(sharding=sharding, mu=mu))
    metrics = [trainer.train_step(make_pairs(seed=s)) for s in range(2)]
    # one pair: rank 1 has none, yet takes part in every collective
    metrics.append(trainer.train_step(make_pairs(1)))
    state = {k: v.detach().numpy().copy() for k, v in trainer.state_dict().items()}
    if rank == 0:
        queue.put((state, metrics))
    leave(queue)


@pytest.mark.parametrize("sharding,mu", [("replicate", 1), ("fsdp2", 2)])
def test_two_ranks_equal_one_process(sharding, mu):
    model = make_model()
    single = Trainer(model, cfg(mu=mu))
    expected = [single.train_step(make_pairs(seed=s)) for s in range(2)]
    expected.append(single.train_step(make_pairs(1)))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + random.randrange(1000)
    procs = [ctx.Process(target=_rank, args=(r, 2, port, sharding, mu, queue)) for r in range(2)]
    for p in procs:
        p.start()
    state, metrics = queue.get(timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name, t in model.state_dict().items():
        assert torch.allclose(torch.from_numpy(state[name]), t, atol=1e-5), name
    for got, want in zip(metrics, expected, strict=True):
        for k in ("loss", "grad_norm", "tokens", "dpo/accuracy", "pairs"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
        # a difference of near-equal float32 sequence sums: summation-order noise
        assert got["dpo/margin"] == pytest.approx(want["dpo/margin"], abs=1e-5)
