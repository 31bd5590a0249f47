"""The transformers engine on the shipped tiny model: n samples, provenance, logprobs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.paths import TINY_MODEL
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.transformers_backend import TransformersEngine
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import build_packed


@pytest.fixture(scope="module")
def engine():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    return TransformersEngine(model, tok, engine_id="hf-test")


def request(engine, text, rid="r0", **sampling):
    ids = [
        engine.tokenizer.bos_token_id,
        *engine.tokenizer(text, add_special_tokens=False)["input_ids"],
    ]
    return GenerateRequest(request_id=rid, prompt_ids=ids, sampling=SamplingParams(**sampling))


def test_n_samples_with_provenance_and_reasons(engine):
    reqs = [
        request(engine, "Q: 50+98-54 A: ", "a", n=4, max_tokens=40, seed=1),
        request(engine, "Q: 3-50+2 A: ", "b", n=4, max_tokens=40, seed=1),
    ]
    results = engine.generate(reqs)
    assert [r.request_id for r in results] == ["a", "b"]
    for r in results:
        assert len(r.completions) == 4
        for c in r.completions:
            assert c.engine_id == "hf-test" and c.policy_version == 0
            assert len(c.logprobs) == len(c.token_ids) > 0
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == engine.eos_id
                assert "The answer is" in c.text


def test_length_cap_reports_length(engine):
    (r,) = engine.generate([request(engine, "Q: 50+98-54 A: ", n=2, max_tokens=3)])
    assert all(c.finish_reason == "length" and len(c.token_ids) == 3 for c in r.completions)


def test_engine_logprobs_match_the_trainer(engine):
    """At T=1 the sampling distribution is the model's: engine and trainer agree."""
    (r,) = engine.generate([request(engine, "Q: 12+7-30 A: ", n=8, max_tokens=40, seed=3)])
    prompt = request(engine, "Q: 12+7-30 A: ").prompt_ids
    seqs = [(prompt, c.token_ids) for c in r.completions]
    (mb,) = build_packed(seqs, 4096)
    with torch.no_grad():
        trainer_lp, _ = micro_batch_logprobs(engine.model, mb, chunk_size=64)
    engine_lp = torch.tensor([lp for i in mb.sample_ids for lp in r.completions[i].logprobs])
    assert torch.allclose(trainer_lp, engine_lp, atol=1e-4)


def test_greedy_is_deterministic(engine):
    a = engine.generate([request(engine, "Q: 5+5+5 A: ", temperature=0.0)])
    b = engine.generate([request(engine, "Q: 5+5+5 A: ", temperature=0.0)])
    assert a[0].completions[0].token_ids == b[0].completions[0].token_ids


def test_mixed_sampling_params_each_get_their_own(engine):
    reqs = [
        request(engine, "Q: 1+1+1 A: ", "a", n=1),
        request(engine, "Q: 2+2+2 A: ", "b", n=3),
        request(engine, "Q: 3+3+3 A: ", "c", n=1),
    ]
    out = engine.generate(reqs)
    assert [len(r.completions) for r in out] == [1, 3, 1]
    assert [r.request_id for r in out] == [r.request_id for r in reqs]


def test_probe_passes_on_the_trainers_weights_and_fails_on_others():
    """The engine's probe logprobs (``common.logprobs``) match the trainer's chunked path on
    the same weights, and a changed model is caught."""
    from inference_server.transformers_backend import DirTransformersEngine
    from inference_server.weights import WeightUpdateError
    from trainer.logprobs import sequence_logprobs

    engine = DirTransformersEngine(TINY_MODEL)
    seqs = [request(engine, q).prompt_ids for q in ("Q: 50+98-54 A: ", "Q: 3-50+2 A: 3-50=")]
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert engine.probe(seqs, sequence_logprobs(model, seqs), tol=1e-4) < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    with pytest.raises(WeightUpdateError, match="logprob probe failed on engine hf-0"):
        engine.probe(seqs, sequence_logprobs(model, seqs), tol=1e-4)
