"""Engine actors placed by the ``inference_node`` resource on a real multi-node Ray cluster
(``ray.cluster_utils.Cluster``: several raylets on this machine), with token auth on.
Uses the transformers backend so four engines start in seconds."""

import subprocess
import sys

import pytest
import torch

from common.paths import TINY_MODEL
from inference_server.actors import PlacementError, start_engines
from inference_server.config import TransformersBackend
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.router import EngineRouter
from inference_server.weights import WeightUpdateError


@pytest.fixture(scope="module")
def cluster(ray_token):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1, resources={"trainer_node": 1})
    ray.init(address=c.address, logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()


def node_of(handle):
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def requests(n_requests, n=4):
    sp = SamplingParams(n=n, max_tokens=40, seed=0)
    return [
        GenerateRequest(request_id=f"q{i}", prompt_ids=[1, 4, 5, 10, 6], sampling=sp)
        for i in range(n_requests)
    ]


def test_engines_land_on_inference_nodes_only_and_share_the_work(cluster):
    import ray

    backend = TransformersBackend(engines_per_node=2, cpus_per_engine=0.5)
    with pytest.raises(PlacementError, match="no Ray node offers the 'inference_node'"):
        start_engines(backend, TINY_MODEL)

    inference = [cluster.add_node(num_cpus=2, resources={"inference_node": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    handles = start_engines(backend, TINY_MODEL)
    assert len(handles) == 4
    placed = [node_of(h) for h in handles.values()]
    assert sorted(placed) == sorted(2 * [n.node_id for n in inference])

    router = EngineRouter(handles)
    results = router.generate(requests(16))
    assert [r.request_id for r in results] == [f"q{i}" for i in range(16)]
    used = {c.engine_id for r in results for c in r.completions}
    assert used == set(handles)  # least outstanding work spread 16 requests over all four

    # a weight update through the object store reaches every engine; the probe checks it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    router.update_weights(1, state)
    assert router.versions() == dict.fromkeys(handles, 1)
    seq = [1, 4, 5, 10, 6, 7, 8]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    assert router.probe([seq], [expected.tolist()], tol=1e-4) < 1e-4
    with pytest.raises(WeightUpdateError, match="already serves version 1"):
        router.update_weights(1, state)
    assert ray.get(handles["hf-0"].served_version.remote()) == 1


def test_a_client_without_the_token_is_refused(cluster, ray_token):
    probe = f"import ray; ray.init(address='{cluster.address}'); print('joined')"
    base = {"PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    wrong = subprocess.run(
        [sys.executable, "-c", probe],
        env={**base, "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "joined" not in wrong.stdout
    assert "auth" in wrong.stderr.lower(), wrong.stderr[-2000:]
    right = subprocess.run(
        [sys.executable, "-c", probe],
        env={**base, "RAY_AUTH_TOKEN_PATH": str(ray_token)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "joined" in right.stdout, right.stderr[-2000:]
