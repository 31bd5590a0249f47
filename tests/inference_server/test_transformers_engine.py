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


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_engine_serves_from_its_device_and_answers_on_the_cpu(device):
    """The engine's model sits on ``device`` (by default CUDA when present, as on the GPU its
    Ray actor reserved); prompts and weight updates arrive as host data, and completions,
    logprobs and checksums come back the same as the CPU engine's. The CUDA case is
    skipped where there is no GPU: it has not run yet."""
    from common.weights import weights_checksum
    from inference_server.transformers_backend import DirTransformersEngine

    default = DirTransformersEngine(TINY_MODEL)
    assert default.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ref = DirTransformersEngine(TINY_MODEL, device="cpu")
    engine = DirTransformersEngine(TINY_MODEL, device=device)
    assert engine.model.device.type == device
    greedy = request(engine, "Q: 50+98-54 A: ", temperature=0.0, max_tokens=40)
    (got,), (want,) = engine.generate([greedy]), ref.generate([greedy])
    assert got.completions[0].token_ids == want.completions[0].token_ids
    assert torch.allclose(
        torch.tensor(got.completions[0].logprobs),
        torch.tensor(want.completions[0].logprobs),
        atol=1e-3,
    )
    seqs = [greedy.prompt_ids + want.completions[0].token_ids]
    lp = engine.prompt_logprobs(seqs)
    assert isinstance(lp[0][0], float)
    assert torch.allclose(torch.tensor(lp), torch.tensor(ref.prompt_logprobs(seqs)), atol=1e-3)
    new = {n: t * 1.01 for n, t in ref.model.state_dict().items() if n in ref.shapes}  # host
    engine.update_weights(1, new)
    ref.update_weights(1, new)
    assert engine.checksum() == ref.checksum() == weights_checksum(new)
    assert all(p.device.type == device for p in engine.model.parameters())
