"""Two real vLLM engine actors behind the router on a local Ray cluster (token auth on):
killing one mid-request loses no request, and weight updates reach the survivor."""

import threading
import time

import pytest
import torch

from common.paths import TINY_MODEL
from inference_server.actors import start_engines
from inference_server.config import VLLMBackend
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.router import EngineRouter, EngineUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(ray_token, tmp_path_factory):
    import ray

    from orchestrator.cluster import start_local

    start_local(
        tmp_path_factory.mktemp("run"),
        num_cpus=4,
        resources={"inference_node": 1},
        dashboard=False,
    )
    backend = VLLMBackend(engines_per_node=2, cpus_per_engine=1, compile=False)
    yield start_engines(backend, TINY_MODEL, max_model_len=128)
    ray.shutdown()


def test_results_are_handed_over_call_by_call_each_once(engines):
    """Each engine's share goes out in ``calls_per_engine`` calls; each call's results reach
    ``on_result`` when it returns, before ``generate`` does, each request exactly once."""
    from inference_server.config import InferenceConfig

    router = EngineRouter(engines, config=InferenceConfig(calls_per_engine=4))
    sp = SamplingParams(n=2, max_tokens=24, seed=0)
    reqs = [
        GenerateRequest(request_id=f"s{i}", prompt_ids=[1, 4, 5, 10, 6, 11, 9, 7], sampling=sp)
        for i in range(32)
    ]
    handed: list[tuple[str, float]] = []
    results = router.generate(
        reqs, on_result=lambda r: handed.append((r.request_id, time.monotonic()))
    )
    returned = time.monotonic()
    assert sorted(rid for rid, _ in handed) == sorted(r.request_id for r in reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    # 2 engines x 4 calls: the first call's results came back well before the last
    times = sorted({t for _, t in handed})
    assert len(times) >= 4, times
    assert times[0] < returned and times[0] < times[-1]


def test_killing_an_engine_mid_request_loses_nothing(engines):
    import ray

    router = EngineRouter(engines)
    sp = SamplingParams(n=8, max_tokens=40, seed=0)
    reqs = [
        GenerateRequest(request_id=f"q{i}", prompt_ids=[1, 4, 5, 10, 6, 11, 9, 7], sampling=sp)
        for i in range(96)
    ]
    victim = engines["vllm-0"]

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while ray.get(victim.inflight.remote()) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(victim)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    results = router.generate(reqs)
    killer.join()
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    assert all(len(r.completions) == 8 for r in results)
    assert all(c.finish_reason in ("stop", "length") for r in results for c in r.completions)
    assert router.requeued > 0, "the engine died with nothing in flight: the test proved nothing"
    assert list(router.dead) == ["vllm-0"]
    assert router.alive == ["vllm-1"]

    # the survivor keeps taking weight updates, verified by the probe
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    metrics = router.update_weights(1, state)
    assert metrics["weight_sync/engines"] == 1
    seq = [1, 4, 5, 10, 6, 7, 8]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    assert router.probe([seq], [expected.tolist()], tol=1e-3) < 1e-3
    assert router.versions() == {"vllm-1": 1}

    ray.kill(engines["vllm-1"])
    with pytest.raises(EngineUnavailable, match="all 2 engines are dead"):
        router.generate(reqs[:2])
