"""Self-healing engines on a real local Ray cluster (token auth on) with transformers engines
on the tiny model: an engine actor SIGKILLed or SIGSTOPped while it generates is killed,
started again with the same id, given weights by the router's ``restore`` hook before it
serves, and its requests are answered once each; past ``inference.max_restarts`` the router
gives up with an error naming the setting. Nothing is mocked: the faults are real signals to
the engine's process."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.paths import TINY_MODEL
from inference_server.actors import engine_spawner
from inference_server.config import InferenceConfig, TransformersBackend
from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.router import EngineRouter, EngineUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_token, tmp_path_factory):
    import ray

    from orchestrator.cluster import start_local

    start_local(
        tmp_path_factory.mktemp("run"), num_cpus=4, resources={"inference_node": 1}, dashboard=False
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights() -> dict[str, Any]:
    """The tiny model's own weights, what a ``restore`` hook loads (as version 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.fixture
def start(cluster) -> Iterator[Any]:
    """``start(engines, **config)``: a router over that many new engines that it may
    restart; every engine actor it ever held is killed afterwards."""
    import ray

    routers: list[EngineRouter] = []

    def make(engines: int, **config: Any) -> EngineRouter:
        backend = TransformersBackend(engines_per_node=engines, cpus_per_engine=1)
        spawner = engine_spawner(backend, TINY_MODEL, timeout_s=120)
        # one call per engine: an engine killed mid-call has answered none of its requests
        # (with more calls it may have answered its first; test_router covers those)
        config = {"calls_per_engine": 1, **config}
        router = EngineRouter(spawner.start(), spawner, InferenceConfig(**config))
        routers.append(router)
        return router

    yield make
    for router in routers:
        for h in [*router.engines.values(), *(r.handle for r in router.restarting.values())]:
            if h is not None:
                ray.kill(h, no_restart=True)


def requests(count: int, n: int = 8, max_tokens: int = 96) -> list[GenerateRequest]:
    sp = SamplingParams(n=n, max_tokens=max_tokens, seed=0)
    return [
        GenerateRequest(request_id=f"q{i}", prompt_ids=[1, 4, 5, 10, 6, 11, 9, 7], sampling=sp)
        for i in range(count)
    ]


def pid(handle: Any) -> int:
    import ray

    return int(ray.get(handle.pid.remote()))


def signal_when_generating(router: EngineRouter, eid: str, sig: int) -> threading.Thread:
    """A started thread that sends ``sig`` to ``eid``'s process once it is generating."""
    import ray

    handle = router.engines[eid]
    target = pid(handle)

    def act() -> None:
        deadline = time.monotonic() + 60
        while router.outstanding[eid] == 0 or ray.get(handle.inflight.remote()) == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine {eid} never started generating")
            time.sleep(0.01)
        time.sleep(0.05)
        os.kill(target, sig)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def check_answered_once(reqs: list[GenerateRequest], results: list[GenerateResult]) -> None:
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert len(res.completions) == req.sampling.n
        assert all(c.finish_reason in ("stop", "length") for c in res.completions)


def gone(process: int, within_s: float = 30.0) -> bool:
    """Whether ``process`` has ended (its pid unused, or a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{process}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_the_only_engine_killed_mid_generate_is_restored_then_serves(start, weights):
    import ray

    router = start(1, restart_backoff_s=0.1)
    old = pid(router.engines["hf-0"])
    restored: list[tuple[str, Any, int]] = []

    def restore(eid: str, handle: Any) -> None:
        # what it had served before this, then version 1 marks everything it serves after
        restored.append((eid, handle, ray.get(handle.served_version.remote())))
        ray.get(handle.update_weights.remote(1, weights))

    router.restore = restore
    reqs = requests(12)
    killer = signal_when_generating(router, "hf-0", signal.SIGKILL)
    results = router.generate(reqs)
    killer.join()

    check_answered_once(reqs, results)
    # the whole call was one chunk on the only engine: every request went to the replacement
    assert router.requeued == 12
    ((eid, handle, before),) = restored
    assert eid == "hf-0" and handle is router.engines["hf-0"] and before == 0
    assert pid(handle) != old and gone(old)
    # served only after restore: every completion carries the version restore loaded
    assert {c.policy_version for r in results for c in r.completions} == {1}
    m = router.metrics()
    assert m["restarts/engine"] == 1 and m["engines/alive"] == 1
    assert m["engines/dead"] == 0 and m["engines/restarting"] == 0 and m["engines/hangs"] == 0
    assert m["requests_requeued"] == m["engines/requeued"] == 12
    assert router.membership == 2  # the killed actor left, its replacement entered


def test_a_killed_engine_s_requests_go_to_the_other_and_it_comes_back(start):
    router = start(2, restart_backoff_s=0.1)
    old = pid(router.engines["hf-0"])
    reqs = requests(12)
    killer = signal_when_generating(router, "hf-0", signal.SIGKILL)
    results = router.generate(reqs)
    killer.join()

    check_answered_once(reqs, results)
    # hf-0 held every other request (least outstanding work) and answered none of them
    assert router.requeued == 6
    assert {c.engine_id for r in results for c in r.completions} == {"hf-1"}
    deadline = time.monotonic() + 60
    while "hf-0" not in router.alive:
        assert time.monotonic() < deadline, f"hf-0 did not come back: {router.lost}"
        router.poll()
        time.sleep(0.1)
    assert pid(router.engines["hf-0"]) != old
    again = router.generate(requests(8))
    check_answered_once(requests(8), again)
    assert {c.engine_id for r in again for c in r.completions} == {"hf-0", "hf-1"}
    m = router.metrics()
    assert m["restarts/engine"] == 1 and m["engines/alive"] == 2 and m["engines/dead"] == 0
    assert router.membership == 2


@pytest.mark.parametrize("by", ["heartbeat", "deadline"])
def test_a_stopped_engine_is_found_hung_killed_and_replaced(start, by):
    """``heartbeat``: a ping unanswered for 3 s. ``deadline``: with heartbeats off (one per
    10 min), the call's work not done in 1.5 x the time the speed measured on a first call
    predicts (at least 4 s)."""
    fast = {"heartbeat_s": 0.5, "heartbeat_timeout_s": 3.0}
    slow = {"heartbeat_s": 600.0, "heartbeat_timeout_s": 600.0, "hang_timeout_s": 4.0}
    slow["hang_factor"] = 1.5
    router = start(1, restart_backoff_s=0.1, **(fast if by == "heartbeat" else slow))
    if by == "deadline":
        router.generate(requests(2))  # measures the engine's speed
        assert router.tokens_per_s["hf-0"] > 0
    stopped = pid(router.engines["hf-0"])
    reqs = requests(12)
    stopper = signal_when_generating(router, "hf-0", signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = router.generate(reqs)
        took = time.monotonic() - t0
        stopper.join()
        assert gone(stopped), "the hung engine's process was left behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    check_answered_once(reqs, results)
    m = router.metrics()
    assert m["engines/hangs"] == 1 and m["restarts/engine"] == 1
    assert m["requests_requeued"] == 12 and m["engines/alive"] == 1
    assert "hung" in router.lost["hf-0"]
    assert ("heartbeat" in router.lost["hf-0"]) == (by == "heartbeat"), router.lost
    assert took < 60  # found within seconds, not after first_generate_timeout_s (600 s)


def test_restarts_exhausted_retire_the_engine_and_the_error_names_the_setting(start):
    router = start(1, max_restarts=1, restart_backoff_s=0.1)
    killed: list[int] = []

    def restore(eid: str, handle: Any) -> None:  # the replacement dies before it serves
        killed.append(pid(handle))
        os.kill(killed[-1], signal.SIGKILL)

    router.restore = restore
    killer = signal_when_generating(router, "hf-0", signal.SIGKILL)
    with pytest.raises(EngineUnavailable, match=r"inference\.max_restarts = 1") as err:
        router.generate(requests(6))
    killer.join()
    assert "6 requests were not served" in str(err.value)
    assert len(killed) == 1  # one restart, then no more
    m = router.metrics()
    assert m["restarts/engine"] == 1 and m["engines/dead"] == 1 and m["engines/alive"] == 0
    assert list(router.dead) == ["hf-0"] and "ActorDiedError" in router.dead["hf-0"]
