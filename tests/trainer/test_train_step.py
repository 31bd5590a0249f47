"""A single-process training step moves the policy in the advantage's direction."""

import pytest
import torch
from pydantic import ValidationError

from trainer.config import TrainerConfig
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer


def sequence_logprob(model, s: TrainSample) -> float:
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
    lp = torch.log_softmax(logits.float(), -1)
    return float(lp.gather(1, torch.tensor(s.completion_ids)[:, None]).sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_positive_advantage_goes_up_negative_goes_down(random_llama, loss_type):
    prompt = [1, 5, 9]
    good = TrainSample(sample_id="g", prompt_ids=prompt, completion_ids=[3, 4, 2], advantage=1.0)
    bad = TrainSample(sample_id="b", prompt_ids=prompt, completion_ids=[7, 8, 2], advantage=-1.0)
    batch = TrainBatch(step=0, samples=[good, bad], max_completion_length=3)
    before = {s.sample_id: sequence_logprob(random_llama, s) for s in (good, bad)}
    trainer = Trainer(random_llama, TrainerConfig(lr=1e-3, loss={"type": loss_type}))
    for _ in range(5):
        metrics = trainer.train_step(batch)
    after = {s.sample_id: sequence_logprob(random_llama, s) for s in (good, bad)}
    assert after["g"] > before["g"] + 0.1
    assert after["b"] < before["b"] - 0.1
    assert metrics["grad_norm"] > 0 and metrics["padding_frac"] == 0.0
    assert trainer.version == 5


def test_kl_penalty_and_tis_run_and_report(random_llama):
    s = TrainSample(
        sample_id="a",
        prompt_ids=[1, 2],
        completion_ids=[3, 4],
        advantage=1.0,
        engine_logprobs=[-1.0, -2.0],
    )
    t = TrainSample(
        sample_id="b", prompt_ids=[1, 2], completion_ids=[5], advantage=-1.0, engine_logprobs=[-3.0]
    )
    cfg = TrainerConfig(loss={"type": "grpo", "kl_beta": 0.1, "tis_cap": 2.0})
    trainer = Trainer(random_llama, cfg)
    m1 = trainer.train_step(TrainBatch(step=0, samples=[s, t], max_completion_length=4))
    m2 = trainer.train_step(TrainBatch(step=1, samples=[s, t], max_completion_length=4))
    assert m1["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # reference == policy before step 1
    assert m2["kl_ref"] > 0
    assert 0 < m1["tis/weight_mean"] <= 2.0


def test_tis_without_engine_logprobs_is_refused(random_llama):
    s = TrainSample(sample_id="a", prompt_ids=[1], completion_ids=[3], advantage=1.0)
    trainer = Trainer(random_llama, TrainerConfig(loss={"type": "grpo", "tis_cap": 2.0}))
    with pytest.raises(ValueError, match="no engine_logprobs"):
        trainer.train_step(TrainBatch(step=0, samples=[s], max_completion_length=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sample_id": "x", "prompt_ids": [1], "completion_ids": [], "advantage": 1.0},
            "completion_ids",
        ),
        (
            {"sample_id": "x", "prompt_ids": [1], "completion_ids": [2], "advantage": float("nan")},
            "advantage is nan",
        ),
        (
            {
                "sample_id": "x",
                "prompt_ids": [1],
                "completion_ids": [2, 3],
                "advantage": 1.0,
                "engine_logprobs": [-1.0],
            },
            "1 engine logprobs for 2 completion tokens",
        ),
    ],
)
def test_malformed_samples_are_rejected(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        TrainSample(**kwargs)
