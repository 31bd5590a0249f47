"""Env pools as Ray actors on a local cluster (token auth on): a dead replica's items are
re-sent to another replica, none lost."""

import threading
import time
from pathlib import Path

import pytest

from common.paths import ARITH_ENV
from reward_envs.config import EnvSpec
from reward_envs.protocol import Item

CHAOS = Path(__file__).parent / "envs" / "chaos"


@pytest.fixture(scope="module")
def ray_cluster(ray_token, tmp_path_factory):
    import ray

    from orchestrator.cluster import start_local

    start_local(tmp_path_factory.mktemp("run"), num_cpus=4, dashboard=False)
    yield
    ray.shutdown()


def test_no_trainer_node_resource_is_a_clear_error(ray_cluster):
    from reward_envs.scorer import RayScorer

    with pytest.raises(RuntimeError, match="no Ray node offers the 'trainer_node' resource"):
        RayScorer([EnvSpec(name="arith", path=ARITH_ENV)])


def test_a_dead_replica_loses_no_item(ray_token, tmp_path):
    import ray

    from orchestrator.cluster import start_local
    from reward_envs.scorer import RayScorer

    ray.shutdown()
    start_local(tmp_path / "run", num_cpus=4, resources={"trainer_node": 1}, dashboard=False)
    scorer = RayScorer(
        [
            EnvSpec(name="arith", path=ARITH_ENV, workers=1),
            EnvSpec(name="chaos", path=CHAOS, workers=1, replicas=2),
        ],
        log_dir=tmp_path / "logs",
    )
    (ok,) = scorer.score("arith", [Item("Q: 1+1+1 A: ", "The answer is 3.", {"answer": "3"})])
    assert ok.score == 1.0 and ok.env == "arith"

    victim = scorer.replicas["chaos"][0]
    killer = threading.Timer(0.3, lambda: ray.kill(victim))
    killer.start()
    t0 = time.monotonic()
    results = scorer.score("chaos", [Item("p", "slow:0.01", {"i": i}) for i in range(200)])
    killer.join()
    assert len(results) == 200 and all(r.score == 1.0 for r in results)
    assert time.monotonic() - t0 > 0.3, "the replica died before scoring started"
    # the dead replica was replaced by a fresh one (EnvSpec.max_restarts)
    assert len(scorer.replicas["chaos"]) == 2 and victim not in scorer.replicas["chaos"]
    assert scorer.metrics()["restarts/pool"] == 1
    scorer.close()
