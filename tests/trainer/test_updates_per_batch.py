"""Several optimizer updates per batch (``trainer.updates_per_batch``, PPO's mu).

The ratio's denominator is the policy before the batch's first update, so from the second
update on the ratio leaves 1 and the clip acts; mu = 1 is the one-update step, bit for bit;
and the tiny model still learns its arithmetic with mu = 2.
"""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.paths import TINY_MODEL, TINY_TRAIN
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.transformers_backend import TransformersEngine
from reward_envs.builtin.arith.env import score
from trainer.advantages import compute_advantages
from trainer.config import TrainerConfig
from trainer.logprobs import micro_batch_logprobs
from trainer.loss import LossInputs, LossParams, policy_loss
from trainer.packing import build_packed
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer, minibatches


def random_batch(n=12, step=0, seed=0):
    rng = random.Random(seed)
    samples = [
        TrainSample(
            sample_id=str(i),
            prompt_ids=[1] + [rng.randrange(3, 64) for _ in range(rng.randrange(2, 6))],
            completion_ids=[rng.randrange(3, 64) for _ in range(rng.randrange(1, 16))],
            advantage=rng.uniform(-1, 1),
        )
        for i in range(n)
    ]
    return TrainBatch(step=step, samples=samples, max_completion_length=16)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo"])
def test_second_update_is_clipped_one_update_never_is(random_llama, loss_type):
    """mu = 2 at a large lr: the second update's ratios against the pre-update policy leave
    the clip range; mu = 1 has ratio 1 everywhere. The version advances once per batch."""
    state = {k: v.clone() for k, v in random_llama.state_dict().items()}
    clip = {}
    for mu in (1, 2):
        random_llama.load_state_dict(state)
        cfg = TrainerConfig(lr=5e-2, updates_per_batch=mu, loss={"type": loss_type})
        trainer = Trainer(random_llama, cfg)
        metrics = [trainer.train_step(random_batch(step=s, seed=s)) for s in range(2)]
        assert trainer.version == 2
        assert all(m["updates"] == mu for m in metrics)
        clip[mu] = [m["clip/frac"] for m in metrics]
        if mu == 1:
            assert all(m["ratio/max"] == 1.0 for m in metrics)
    print(f"{loss_type}: clip/frac mu=1 {clip[1]}, mu=2 {clip[2]}")
    assert clip[1] == [0.0, 0.0]
    assert all(c > 0 for c in clip[2])


def reference_step(model, optimizer, batch, cfg):
    """The one-update step written out: old logprobs = detached current ones."""
    seqs = [(s.prompt_ids, s.completion_ids) for s in batch.samples]
    micro = build_packed(seqs, cfg.max_tokens_per_micro_batch, cfg.pack_row_tokens, 0)
    num_tokens = sum(len(s.completion_ids) for s in batch.samples)
    params = LossParams(eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high)
    optimizer.zero_grad(set_to_none=True)
    for mb in micro:
        logps, entropy = micro_batch_logprobs(model, mb, cfg.logprob_chunk_size)
        inp = LossInputs(
            logprobs=logps,
            old_logprobs=logps.detach(),
            advantages=torch.tensor([batch.samples[i].advantage for i in mb.sample_ids]),
            seq_ids=mb.seq_ids,
            num_sequences=len(batch.samples),
            num_tokens=num_tokens,
            max_completion_length=batch.max_completion_length,
            entropy=entropy,
        )
        loss, _ = policy_loss(cfg.loss.type, inp, params)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()


def test_one_update_per_batch_is_the_plain_step_bit_for_bit(random_llama):
    import copy

    cfg = TrainerConfig(
        lr=1e-2, max_tokens_per_micro_batch=48, pack_row_tokens=48, logprob_chunk_size=16
    )
    assert cfg.updates_per_batch == 1
    ref_model = copy.deepcopy(random_llama)
    ref_opt = torch.optim.AdamW(
        ref_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    trainer = Trainer(random_llama, cfg)
    for step in range(3):
        batch = random_batch(step=step, seed=step)
        trainer.train_step(batch)
        reference_step(ref_model, ref_opt, batch, cfg)
    want = ref_model.state_dict()
    for name, got in random_llama.state_dict().items():
        assert torch.equal(got, want[name]), name


def test_minibatches_are_ordered_non_empty_and_balanced_by_tokens():
    lengths = [random.Random(i).randrange(1, 100) for i in range(101)]
    for parts in (1, 2, 3, 7):
        runs = minibatches(lengths, parts)
        assert len(runs) == parts and all(runs)
        assert [i for r in runs for i in r] == list(range(101))
        loads = [sum(lengths[i] for i in r) for r in runs]
        assert max(loads) - min(loads) <= 2 * max(lengths)
    assert minibatches([5, 5], 4) == [[0], [1]]  # never more runs than samples
    assert minibatches([1, 1, 1, 1, 100], 2) == [[0, 1, 2, 3], [4]]


def prompt_ids(tok, text):
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


def test_tiny_model_learns_with_two_updates_per_batch():
    """GRPO with mu = 2 on the shipped tiny model, in this process (a transformers engine
    sharing the model, the arith env's reward function, no Ray): 8 training prompts x 8
    samples per step, the same prompts every step, and their reward rises while the clip
    acts. (mu = 2 moves the weights about twice as far per batch as mu = 1: lr 2e-4 learns,
    5e-4 collapses the policy within a few steps.)"""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    engine = TransformersEngine(model, tok)
    rows = [json.loads(x) for x in TINY_TRAIN.read_text().splitlines()[:8]]
    trainer = Trainer(model, TrainerConfig(lr=2e-4, updates_per_batch=2), pad_id=tok.pad_token_id)
    rewards, clip = [], []
    for step in range(12):
        sp = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=step)
        reqs = [
            GenerateRequest(
                request_id=r["id"], prompt_ids=prompt_ids(tok, r["prompt"]), sampling=sp
            )
            for r in rows
        ]
        samples, scores = [], []
        for r, req, res in zip(rows, reqs, engine.generate(reqs), strict=True):
            group = torch.tensor(
                [[score(r["prompt"], c.text, r["answer"]) for c in res.completions]]
            )
            scores.extend(group[0].tolist())
            adv = compute_advantages(group, "grpo", True)
            if not bool(adv.zero_variance[0]):
                samples += [
                    TrainSample(
                        sample_id=f"{r['id']}/{i}",
                        prompt_ids=req.prompt_ids,
                        completion_ids=c.token_ids,
                        advantage=float(adv.values[0, i]),
                        engine_logprobs=c.logprobs,
                    )
                    for i, c in enumerate(res.completions)
                ]
        rewards.append(sum(scores) / len(scores))
        if samples:
            metrics = trainer.train_step(
                TrainBatch(step=step, samples=samples, max_completion_length=40)
            )
            clip.append(metrics["clip/frac"])
        engine.version = trainer.version
    print(
        f"reward per step {[round(r, 3) for r in rewards]}; clip/frac {[round(c, 4) for c in clip]}"
    )
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert sum(clip) > 0  # the second update of a batch was clipped somewhere
