"""The trainer's policy is the sampling policy: logprobs, entropy and the reference model's
logprobs are those of ``softmax(logits / T)`` at the batch's sampling temperature."""

import pytest
import torch

from trainer.config import TrainerConfig
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer


def tempered(model, prompt, completion, temperature):
    """Logprobs and entropies of ``completion`` under ``softmax(logits / T)``, full logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    lp = torch.log_softmax(logits, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    return lp.gather(1, torch.tensor(completion)[:, None])[:, 0], entropy


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.6])
def test_trainer_logprobs_and_entropy_are_at_the_sampling_temperature(random_llama, temperature):
    rows = [([1, 5, 9], [3, 4, 2, 8]), ([1, 7], [11, 12]), ([1, 2, 3, 4], [40, 41, 42])]
    samples, entropies = [], []
    for i, (prompt, completion) in enumerate(rows):
        lp, ent = tempered(random_llama, prompt, completion, temperature)
        entropies.append(ent)
        samples.append(
            TrainSample(
                sample_id=str(i),
                prompt_ids=prompt,
                completion_ids=completion,
                advantage=float(i) - 1.0,
                engine_logprobs=lp.tolist(),  # what an engine sampling at T reports
            )
        )
    batch = TrainBatch(step=0, samples=samples, max_completion_length=4, temperature=temperature)
    trainer = Trainer(random_llama, TrainerConfig(loss={"type": "grpo", "kl_beta": 0.1}))
    metrics = trainer.train_step(batch)
    assert metrics["engine/logprob_diff_max"] < 1e-5
    assert metrics["entropy"] == pytest.approx(float(torch.cat(entropies).mean()), rel=1e-5)
    assert metrics["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # reference at the same T


def test_temperature_must_be_positive():
    s = TrainSample(sample_id="a", prompt_ids=[1], completion_ids=[2], advantage=1.0)
    with pytest.raises(ValueError, match="temperature"):
        TrainBatch(step=0, samples=[s], max_completion_length=1, temperature=0.0)
    assert TrainBatch(step=0, samples=[s], max_completion_length=1).temperature == 1.0
