"""PPO's training step (trainer/ppo_step.py, trainer/critic.py): the policy moves towards the
better-scored completion, the critic learns the returns, the critic is checkpointed with
the policy, and two gloo ranks (real torch.distributed processes) make the single-process
update."""

import copy
import random

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer.test_data_parallel import leave, make_model
from trainer.config import TrainerConfig
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer


def make_batch(n=9, seed=0):
    rng = random.Random(seed)
    samples = [
        TrainSample(
            sample_id=str(i),
            prompt_ids=[1] + [rng.randrange(3, 64) for _ in range(rng.randrange(2, 6))],
            completion_ids=[rng.randrange(3, 64) for _ in range(rng.randrange(1, 14))],
            advantage=0.0,
            reward=float(rng.random() < 0.5),
        )
        for i in range(n)
    ]
    return TrainBatch(step=0, samples=samples, max_completion_length=14)


def cfg(sharding="replicate", mu=1, **loss):
    return TrainerConfig(
        lr=1e-2,
        loss={"type": "ppo", "critic_lr": 1e-2, "kl_coef": 0.05, **loss},
        sharding=sharding,
        updates_per_batch=mu,
        max_tokens_per_micro_batch=48,
        pack_row_tokens=48,
        logprob_chunk_size=16,
    )


def seq_logprob(model, s: TrainSample) -> float:
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
    lp = torch.log_softmax(logits.float(), -1)
    return float(lp.gather(1, torch.tensor(s.completion_ids)[:, None]).sum())


def test_policy_prefers_the_rewarded_completion_and_the_critic_learns_returns():
    prompt = [1, 5, 9]
    good = TrainSample(
        sample_id="g", prompt_ids=prompt, completion_ids=[3, 4, 2], advantage=0, reward=1.0
    )
    bad = TrainSample(
        sample_id="b", prompt_ids=prompt, completion_ids=[7, 8, 2], advantage=0, reward=0.0
    )
    batch = TrainBatch(step=0, samples=[good, bad], max_completion_length=3)
    model = make_model()
    before = {s.sample_id: seq_logprob(model, s) for s in (good, bad)}
    trainer = Trainer(model, cfg(gamma=1.0, lam=1.0))
    history = [trainer.train_step(batch) for _ in range(30)]
    after = {s.sample_id: seq_logprob(model, s) for s in (good, bad)}
    assert after["g"] - after["b"] > before["g"] - before["b"] + 0.5
    assert history[0]["value/mean"] == 0.0  # the head starts at zero
    assert history[-1]["value/loss"] < 0.2 * history[0]["value/loss"]
    # with gamma = lam = 1 and the values learned, each token's value nears its return
    assert history[-1]["value/mean"] == pytest.approx(history[-1]["returns/mean"], abs=0.15)
    assert trainer.version == 30 and history[-1]["critic/grad_norm"] > 0


def test_the_critic_is_checkpointed_with_the_policy():
    trainer = Trainer(make_model(), cfg(mu=2))
    trainer.train_step(make_batch())
    saved = copy.deepcopy(trainer.checkpoint())
    assert {"critic", "critic_optimizer"} <= set(saved)
    expected = trainer.train_step(make_batch(seed=1))
    resumed = Trainer(make_model(), cfg(mu=2))
    resumed.restore(saved)
    got = resumed.train_step(make_batch(seed=1))
    for k in ("loss", "value/loss", "value/mean", "grad_norm", "critic/grad_norm"):
        assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k
    for (name, p), q in zip(
        trainer.critic.named_parameters(), resumed.critic.parameters(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-7), name


def test_ppo_refuses_samples_without_rewards():
    trainer = Trainer(make_model(), cfg())
    s = TrainSample(sample_id="a", prompt_ids=[1], completion_ids=[3, 4], advantage=1.0)
    with pytest.raises(ValueError, match="algorithm = 'ppo'"):
        trainer.train_step(TrainBatch(step=0, samples=[s, s], max_completion_length=2))


def _rank(rank, world, port, sharding, mu, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    trainer = Trainer(make_model(), cfg(sharding, mu))
    metrics = [trainer.train_step(make_batch(seed=s)) for s in range(2)]
    state = {k: v.detach().numpy().copy() for k, v in trainer.state_dict().items()}
    critic = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
        for k, v in trainer.critic.state_dict().items()
    }
    if rank == 0:
        queue.put((state, critic, metrics))
    leave(queue)


@pytest.mark.parametrize("sharding,mu", [("replicate", 1), ("fsdp2", 2)])
def test_two_ranks_equal_one_process(sharding, mu):
    model = make_model()
    single = Trainer(model, cfg(mu=mu))
    expected = [single.train_step(make_batch(seed=s)) for s in range(2)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29000 + random.randrange(1000)
    procs = [ctx.Process(target=_rank, args=(r, 2, port, sharding, mu, queue)) for r in range(2)]
    for p in procs:
        p.start()
    state, critic, metrics = queue.get(timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name, t in model.state_dict().items():
        assert torch.allclose(torch.from_numpy(state[name]), t, atol=1e-5), name
    for name, t in single.critic.state_dict().items():
        assert torch.allclose(torch.from_numpy(critic[name]), t, atol=1e-5), name
    for got, want in zip(metrics, expected, strict=True):
        for k in ("loss", "grad_norm", "critic/grad_norm", "value/loss", "tokens"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_mixed_precision_ppo_step_computes_the_critic_in_bf16():
    """bf16 passes over float32 parameters: the critic follows the policy's precision, so
    its values after a step differ from the float32 run's by bf16 rounding (not at all
    would mean the critic ignored the compute dtype)."""
    batch = make_batch()
    full = Trainer(make_model(), cfg())
    mixed = Trainer(make_model(), cfg().model_copy(update={"dtype": "bfloat16"}))
    assert mixed.critic is not None and mixed.critic.autocast == torch.bfloat16
    f = [full.train_step(batch) for _ in range(2)]
    m = [mixed.train_step(batch) for _ in range(2)]
    assert m[1]["value/mean"] != f[1]["value/mean"]
    assert m[1]["value/mean"] == pytest.approx(f[1]["value/mean"], rel=0.1, abs=1e-3)
    assert m[1]["value/loss"] == pytest.approx(f[1]["value/loss"], rel=0.1)
