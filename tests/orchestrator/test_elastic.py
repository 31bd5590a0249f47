"""Elastic inference on a real multi-node Ray cluster (``cluster_utils.Cluster``, token auth
on, transformers engines on the tiny model): an inference node that joins mid-run gets an
engine with the current weights that serves the next rollout and takes the next push; an
engine drained while it generates finishes its requests and leaves, and the run goes on; an
engine count asked through the run's API (real HTTP on 127.0.0.1, bearer token) is applied
at the next step. Nothing is mocked."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import pytest

from orchestrator.config import load_config
from orchestrator.loop import load_policy
from orchestrator.rollout import build_batch, rollout, sampling_params
from orchestrator.sampler import PromptSampler

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Any, port: int) -> Any:
    return load_config(
        overrides=[
            f"output_dir='{tmp_path}'",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=32",
            "inference.backend={type='transformers', cpus_per_engine=1}",
            "trainer.cpus_per_rank=1",
            "inference.weight_sync='collective'",
            "env_api.enabled=true",
            f"env_api.port={port}",
        ]
    )


def api_client(live: Any, port: int, token: bool = True) -> httpx.Client:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {(live.state_dir / 'api-token').read_text().strip()}"
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def cluster(ray_token):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=2, resources={"inference_node": 1})
    c.add_node(num_cpus=4, resources={"trainer_node": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()


def test_an_engine_joins_with_a_node_serves_and_drains_away(cluster, tmp_path):
    import ray

    from inference_server.protocol import GenerateRequest, SamplingParams
    from orchestrator.live import LiveEnvs
    from orchestrator.parts import ray_parts

    port = free_port()
    cfg = config(tmp_path, port)
    model, tok = load_policy(cfg)
    run = ray_parts(cfg, tok)
    live = LiveEnvs(cfg, run.scorer, None)
    api = api_client(live, port)
    sampler = PromptSampler(cfg.datasets, cfg.seed)
    router, logs = run.engines, []

    def step(i: int) -> tuple[set[str], dict[str, float]]:
        r = rollout(router, run.scorer, sampling_params(cfg), sampler.sample(4), tok, {})
        batch, _ = build_batch(i, r, cfg)
        assert batch is not None
        run.trainers.train_step(batch)
        metrics = run.push(i + 1)
        assert metrics["weight_sync/probe_mean_diff"] < 1e-4  # every engine serves i + 1
        return {c.engine_id for res in r.results for c in res.completions}, metrics

    def node(eid: str) -> str:
        h = router.engines[eid]
        return ray.get(h.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))

    try:
        assert step(0)[0] == {"hf-0"}
        t0 = time.monotonic()
        assert run.scale(1, live.engine_requests, logs.append) == {"engines/target": 1.0}
        assert time.monotonic() - t0 < 1 and router.alive == ["hf-0"]  # nothing changed

        # a second inference node joins: an engine starts there with the current weights
        new = cluster.add_node(num_cpus=2, resources={"inference_node": 1})
        cluster.wait_for_nodes()
        run.scale(1, live.engine_requests, logs.append)
        assert router.alive == ["hf-0", "hf-1"] and node("hf-1") == new.node_id
        assert router.versions() == {"hf-0": 1, "hf-1": 1}
        assert any("engine 'hf-1' joined" in line for line in logs), logs
        served, metrics = step(1)
        assert served == {"hf-0", "hf-1"}  # it took work at once
        assert metrics["weight_sync/engines"] == 2 and metrics["weight_sync/regrouped"] == 1
        assert router.versions() == {"hf-0": 2, "hf-1": 2}
        got = api.get("/v1/engines").json()["engines"]
        assert [(e["id"], e["state"], e["version"]) for e in got] == [
            ("hf-0", "serving", 1),
            ("hf-1", "serving", 1),
        ]  # as step 1 saw them, before its push

        # drained while it generates: its requests are answered, then it leaves
        sp = SamplingParams(n=4, max_tokens=48, seed=0)
        reqs = [
            GenerateRequest(request_id=f"q{i}", prompt_ids=[1, 4, 5, 10], sampling=sp)
            for i in range(8)
        ]
        out: list[Any] = []
        gen = threading.Thread(target=lambda: out.extend(router.generate(reqs)))
        gen.start()
        while router.outstanding["hf-1"] == 0:
            time.sleep(0.01)
        router.drain("hf-1")
        assert router.states()["hf-1"] == "draining"  # it holds work: it stays until done
        gen.join(60)
        assert not gen.is_alive()
        assert [r.request_id for r in out] == [r.request_id for r in reqs]
        assert "hf-1" in {c.engine_id for r in out for c in r.completions}
        router.poll()
        assert router.states()["hf-1"] == "left" and router.alive == ["hf-0"]
        served, metrics = step(2)
        assert served == {"hf-0"} and metrics["weight_sync/engines"] == 1
        assert router.metrics()["engines/left"] == 1 and router.metrics()["engines/dead"] == 0
        with pytest.raises(ValueError, match="last engine in service"):
            router.drain("hf-0")

        # two engines asked through the API: one starts at the next step (hf-1's place)
        assert api.put("/v1/engines", json={"engines": 2}).status_code == 202
        run.scale(3, live.engine_requests, logs.append)
        assert router.alive == ["hf-0", "hf-2"] and router.versions() == {"hf-0": 3, "hf-2": 3}
        served, metrics = step(3)
        assert served == {"hf-0", "hf-2"} and metrics["weight_sync/engines"] == 2
        # ... and hf-2 drained through it
        assert api.post("/v1/engines/hf-2/drain").status_code == 202
        run.scale(4, live.engine_requests, logs.append)
        assert router.alive == ["hf-0"]
        assert step(4)[1]["weight_sync/engines"] == 1
        assert router.metrics()["engines/joined"] == 2
        assert router.metrics()["engines/left"] == 2
    finally:
        api.close()
        live.close()
        run.close()


def test_engine_routes_need_the_token_and_check_requests(tmp_path):
    """The routes alone (no Ray): the env API's token, a count below 1 refused with the
    field named, an unknown id 404, the last serving engine 409; requests are recorded."""
    from orchestrator.elastic import EngineList, EngineOut
    from orchestrator.live import LiveEnvs

    port = free_port()
    live = LiveEnvs(config(tmp_path, port), None, None)
    box = live.engine_requests
    try:
        with api_client(live, port, token=False) as anon:
            assert anon.get("/v1/engines").status_code == 401
            assert anon.put("/v1/engines", json={"engines": 2}).status_code == 401
        api = api_client(live, port)
        assert api.get("/v1/engines").json()["step"] is None
        seen = [EngineOut(id="hf-0", state="serving", version=3)]
        seen += [EngineOut(id="hf-1", state="left", version=None)]
        box.publish(EngineList(step=5, engines=seen, target=1, capacity=2))
        bad = api.put("/v1/engines", json={"engines": 0})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "engines"]
        assert "greater than or equal to 1" in bad.json()["detail"][0]["msg"]
        unknown = api.post("/v1/engines/hf-9/drain")
        assert unknown.status_code == 404 and "hf-9" in unknown.json()["detail"]
        assert api.post("/v1/engines/hf-1/drain").status_code == 409  # it left
        last = api.post("/v1/engines/hf-0/drain")
        assert last.status_code == 409 and "last engine serving" in last.json()["detail"]
        more = api.put("/v1/engines", json={"engines": 3})
        assert more.status_code == 202
        assert more.json()["detail"] == (
            "at the next step 2 engines start (1 -> 3); only 2 fit on the inference nodes"
        )
        assert api.get("/v1/engines").json()["asked_target"] == 3
        assert box.take() == (3, []) and box.take() == (None, [])
        api.close()
    finally:
        live.close()
