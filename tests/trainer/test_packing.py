"""Packing: no attention across sequence boundaries; packed == unpacked loss and grads.

DESIGN.md records that position ids alone did not isolate sequences under sdpa
with an older transformers; this test is the guard that the installed one does.
"""

import random

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import build_packed, build_padded, first_fit_decreasing, padding_fraction
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer


def make_batch(n=12, seed=0):
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        p = [rng.randrange(1, 64) for _ in range(rng.randint(2, 9))]
        c = [rng.randrange(1, 64) for _ in range(rng.randint(1, 20))]
        samples.append(
            TrainSample(
                sample_id=f"s{i}", prompt_ids=p, completion_ids=c, advantage=rng.uniform(-1, 1)
            )
        )
    return TrainBatch(step=0, samples=samples, max_completion_length=20)


def packed_logprobs(model, batch, budget, row_tokens=None):
    seqs = [(s.prompt_ids, s.completion_ids) for s in batch.samples]
    out = {}
    for mb in build_packed(seqs, budget, row_tokens):
        lp, _ = micro_batch_logprobs(model, mb, chunk_size=16)
        for local, sample in enumerate(mb.sample_ids):
            out[sample] = lp[mb.seq_ids == local]
    return out


def alone_logprobs(model, batch):
    """Each sequence through the model on its own (a plain causal forward)."""
    out = {}
    for i, s in enumerate(batch.samples):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
        out[i] = torch.log_softmax(logits.float(), -1).gather(
            1, torch.tensor(s.completion_ids)[:, None]
        )[:, 0]
    return out


@pytest.mark.parametrize(("budget", "row_tokens"), [(64, None), (128, 32), (1000, 40)])
def test_packed_logprobs_equal_each_sequence_alone(random_llama, budget, row_tokens):
    batch = make_batch()
    seqs = [(s.prompt_ids, s.completion_ids) for s in batch.samples]
    micro = build_packed(seqs, budget, row_tokens)
    assert len(micro) < 12 and sum(len(mb.sample_ids) for mb in micro) == 12
    with torch.no_grad():
        alone = alone_logprobs(random_llama, batch)
        packed = packed_logprobs(random_llama, batch, budget, row_tokens)
    assert len(packed) == len(alone) == len(batch.samples)
    for i in alone:
        assert torch.allclose(packed[i], alone[i], atol=1e-5), f"sample {i} differs"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "dr_grpo"])
def test_packed_step_equals_unpacked_loss_and_grads(random_llama, loss_type):
    import copy

    batch = make_batch()
    grads, losses = {}, {}
    for layout, budget in (("padded", 16), ("packed", 64), ("packed", 100)):
        model = copy.deepcopy(random_llama)
        cfg = TrainerConfig(
            layout=layout,
            max_tokens_per_micro_batch=max(budget, 40),
            pack_row_tokens=32,
            logprob_chunk_size=16,
            max_grad_norm=1e9,  # compare raw gradients (the step leaves .grad in place)
            loss={"type": loss_type},
        )
        trainer = Trainer(model, cfg)
        metrics = trainer.train_step(batch)
        losses[budget] = metrics["loss"]
        grads[budget] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for packed in (64, 100):
        assert losses[packed] == pytest.approx(losses[16], abs=1e-6)
        assert torch.allclose(grads[packed], grads[16], atol=1e-6)


def test_first_fit_decreasing_keeps_every_item_once():
    lengths = [random.Random(1).randint(1, 50) for _ in range(200)]
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)


def test_padding_fraction_reported():
    seqs = [([1, 2], [3] * n) for n in (1, 10, 30)]
    padded = build_padded(seqs, 200)
    packed = build_packed(seqs, 200)
    assert padding_fraction(packed) == 0.0
    assert padding_fraction(padded) == pytest.approx(1 - (3 + 12 + 32) / (3 * 32))


def test_sequence_longer_than_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="raise trainer.max_tokens_per_micro_batch"):
        build_packed([([1] * 10, [2] * 10)], 16)
