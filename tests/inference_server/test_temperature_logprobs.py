"""Engine and trainer agree on the sampling policy at T != 1 (transformers backend).

The engine reports logprobs of the sampled tokens under the distribution it sampled from,
``softmax(logits / T)`` (top_p 1, top_k off); the trainer, given the batch's temperature,
must compute the same numbers, or truncated importance sampling weighs every token by the
temperature's distortion. The vLLM engine's twin of this test is in test_vllm_engine.py.
"""

import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.paths import TINY_MODEL
from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.transformers_backend import TransformersEngine
from trainer.config import TrainerConfig
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer

PROMPTS = ["Q: 50+98-54 A: ", "Q: 3-50+2 A: ", "Q: 12+7-30 A: "]
TEMPERATURE = 0.7


def requests(tok, temperature, seed=0):
    sp = SamplingParams(n=8, temperature=temperature, top_p=1.0, top_k=0, max_tokens=40, seed=seed)
    return [
        GenerateRequest(
            request_id=str(i),
            prompt_ids=[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]],
            sampling=sp,
        )
        for i, p in enumerate(PROMPTS)
    ]


def logprob_diff(
    model, reqs: list[GenerateRequest], results: list[GenerateResult], temperature: float
) -> float:
    """Max |trainer - engine| logprob over every sampled token, through ``Trainer.train_step``
    (a copy of ``model``: the step also updates it)."""
    samples = [
        TrainSample(
            sample_id=f"{req.request_id}/{i}",
            prompt_ids=req.prompt_ids,
            completion_ids=c.token_ids,
            advantage=1.0 if i % 2 else -1.0,
            engine_logprobs=c.logprobs,
        )
        for req, res in zip(reqs, results, strict=True)
        for i, c in enumerate(res.completions)
    ]
    batch = TrainBatch(step=0, samples=samples, max_completion_length=40, temperature=temperature)
    trainer = Trainer(copy.deepcopy(model), TrainerConfig(loss={"type": "grpo", "tis_cap": 2.0}))
    return trainer.train_step(batch)["engine/logprob_diff_max"]


def test_transformers_engine_and_trainer_agree_at_temperature_0_7():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    engine = TransformersEngine(model, tok, engine_id="hf-temp")
    reqs = requests(tok, TEMPERATURE)
    results = engine.generate(reqs)
    diff = logprob_diff(model, reqs, results, TEMPERATURE)
    print(f"transformers engine vs trainer at T={TEMPERATURE}: max |diff| {diff:.2e}")
    assert diff < 2e-3
    # the check has teeth: the same completions scored at T = 1 are far off
    assert logprob_diff(model, reqs, results, 1.0) > 0.05
