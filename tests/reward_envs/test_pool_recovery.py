"""Self-healing env pools on a real local Ray cluster with real env workers: a pool host
killed (kill -9) or hung (SIGSTOP) is replaced by a fresh one whose pool scores its items,
each exactly once; a worker killed mid-item is retried in place; a run that keeps losing hosts
gets a clear error; an env whose items keep failing is quarantined by its circuit breaker."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from common.paths import ARITH_ENV
from reward_envs.config import EnvSpec
from reward_envs.protocol import Item

CHAOS = Path(__file__).parent / "envs" / "chaos"


@pytest.fixture(scope="module")
def ray_cluster(ray_token, tmp_path_factory):
    import ray

    from orchestrator.cluster import start_local

    ray.shutdown()
    start_local(
        tmp_path_factory.mktemp("run"),
        num_cpus=8,
        resources={"trainer_node": 1},
        dashboard=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def chaos(ray_cluster, tmp_path):
    """A RayScorer for the chaos test env with one replica; ``chaos(**spec fields)``."""
    from reward_envs.scorer import RayScorer

    made = []

    def make(**kw):
        spec = EnvSpec(name="chaos", path=CHAOS, **{"restart_backoff_s": 0.1, **kw})
        made.append(RayScorer([spec], log_dir=tmp_path / "logs"))
        return made[-1]

    yield make
    for scorer in made:
        scorer.close()


def slow(n, secs):
    return [Item("p", f"slow:{secs}", {"i": i}) for i in range(n)]


def worker_pids(results):
    return {int(r.worker.split(":")[1]) for r in results}


def test_a_killed_pool_host_is_restarted_and_its_items_scored_once(chaos):
    import ray

    scorer = chaos(workers=2)
    (old,) = scorer.replicas["chaos"]
    pid = ray.get(old.host.actor.pid.remote())
    old_workers = set(ray.get(old.host.actor.pids.remote(old.key)))
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    results = scorer.score("chaos", slow(40, 0.05))
    killer.join()
    assert time.monotonic() - t0 > 0.5, "the host died before scoring started"
    assert len(results) == 40 and all(r.score == 1.0 and r.error is None for r in results)
    assert not worker_pids(results) & old_workers, "results of the dead replica were kept"
    (fresh,) = scorer.replicas["chaos"]
    assert fresh != old and ray.get(fresh.host.actor.pid.remote()) != pid
    m = scorer.metrics()
    assert m["restarts/pool"] == 1 and m["items_rescored"] == 40
    assert m["envs/chaos/replicas_lost"] == 1 and m["envs/chaos/replicas_alive"] == 1
    # the fresh replica scored each item once: no item twice, none lost
    assert m["envs/chaos/items"] == 40 and m["envs/chaos/scored"] == 40
    assert m["envs/chaos/errors"] == 0 and m["envs_quarantined"] == 0
    assert scorer.quarantined() == {}
    (again,) = scorer.score("chaos", [Item("p", "ok", {})])
    assert again.score == 1.0


def test_a_worker_killed_mid_item_is_retried_not_an_error(chaos):
    import ray

    scorer = chaos(workers=1)
    (replica,) = scorer.replicas["chaos"]
    (worker,) = ray.get(replica.host.actor.pids.remote(replica.key))
    killer = threading.Timer(0.7, os.kill, (worker, signal.SIGKILL))
    killer.start()
    results = scorer.score("chaos", slow(10, 0.2))
    killer.join()
    assert len(results) == 10 and all(r.score == 1.0 and r.error is None for r in results)
    pids = worker_pids(results)
    assert worker in pids and len(pids) == 2, "the kill did not land mid-batch"
    m = scorer.metrics()
    assert m["restarts/worker"] == 1 and m["envs/chaos/restarts"] == 1
    assert m["envs/chaos/errors"] == 0 and m["envs/chaos/items"] == 10
    assert m["restarts/pool"] == 0 and m["items_rescored"] == 0


def test_a_hung_pool_host_is_killed_and_replaced(chaos):
    import ray

    scorer = chaos(workers=2, timeout_s=0.25, hang_timeout_s=2.0)
    (old,) = scorer.replicas["chaos"]
    pid = ray.get(old.host.actor.pid.remote())
    old_workers = set(ray.get(old.host.actor.pids.remote(old.key)))
    deadline = scorer.deadline_s("chaos", old, 8)
    assert deadline == 2.0 + 2 * 0.25 * 4
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = scorer.score("chaos", [Item("p", "ok", {"i": i}) for i in range(8)])
        elapsed = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert deadline <= elapsed < 40
    assert len(results) == 8 and all(r.score == 1.0 and r.error is None for r in results)
    assert not worker_pids(results) & old_workers
    m = scorer.metrics()
    assert m["restarts/pool"] == 1 and m["items_rescored"] == 8
    assert m["envs/chaos/replicas_lost"] == 1 and m["envs/chaos/replicas_alive"] == 1
    assert m["envs/chaos/items"] == 8


def test_restarts_used_up_is_a_clear_error(chaos):
    import ray

    scorer = chaos(workers=2, max_restarts=1, restart_backoff_s=0.0)
    stop = threading.Event()

    def kill_every_replica():  # by killing its host (one replica each here)
        seen = set()
        while not stop.is_set():
            for r in list(scorer.replicas["chaos"]):
                if r not in seen:
                    seen.add(r)
                    time.sleep(0.3)
                    ray.kill(r.host.actor)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_every_replica)
    killer.start()
    try:
        with pytest.raises(RuntimeError) as err:
            scorer.score("chaos", slow(20, 0.1))
    finally:
        stop.set()
        killer.join()
    msg = str(err.value)
    assert "every pool of env 'chaos' died or hung" in msg
    assert "EnvSpec.max_restarts = 1 within 10 minutes; 1 made in the run" in msg
    assert "20 items unscored" in msg
    assert str(scorer.log_dir) in msg and "raise max_restarts" in msg
    m = scorer.metrics()
    assert m["restarts/pool"] == 1 and m["items_rescored"] == 40
    assert m["envs/chaos/replicas_lost"] == 2 and m["envs/chaos/replicas_alive"] == 0
    reason = scorer.quarantined()["chaos"]
    assert "restarted 1 times in the last 10 minutes" in reason
    assert "max_restarts = 1" in reason and m["envs/chaos/quarantined"] == 1


def test_the_breaker_quarantines_a_failing_env_not_a_healthy_one(tmp_path):
    from reward_envs.scorer import LocalScorer

    scorer = LocalScorer(
        [
            EnvSpec(name="bad", path=CHAOS, workers=1),
            EnvSpec(name="mixed", path=CHAOS, workers=1, breaker_window=8, breaker_min_items=4),
            EnvSpec(name="arith", path=ARITH_ENV, workers=1),
        ],
        log_dir=tmp_path / "logs",
    )
    try:
        raised = [Item("p", "raise", {})]
        scorer.score("bad", raised * 31)
        assert scorer.quarantined() == {}, "31 results are fewer than breaker_min_items"
        (r,) = scorer.score("bad", raised)
        assert r.error_kind == "exception"
        assert scorer.quarantined() == {
            "bad": "env 'bad' quarantined: 32 of its last 32 items errored (exception 32)"
        }
        (still,) = scorer.score("bad", [Item("p", "ok", {})])  # still scored when asked
        assert still.score == 1.0

        ok = Item("p", "ok", {})
        scorer.score("mixed", (raised + [ok]) * 4 + raised)
        assert "mixed" not in scorer.quarantined(), "4 of the last 8 is not more than half"
        scorer.score("mixed", raised)
        assert scorer.quarantined()["mixed"] == (
            "env 'mixed' quarantined: 5 of its last 8 items errored (exception 5)"
        )

        good = scorer.score("arith", [Item("Q: 1+1 A: ", "The answer is 2.", {"answer": "2"})] * 40)
        assert all(r.score == 1.0 for r in good) and "arith" not in scorer.quarantined()
        m = scorer.metrics()
        assert m["envs/bad/quarantined"] == 1 and m["envs/arith/quarantined"] == 0
        assert m["envs_quarantined"] == 2
        assert m["restarts/pool"] == 0 and m["items_rescored"] == 0 and m["restarts/worker"] == 0
    finally:
        scorer.close()


def test_the_ray_scorer_has_the_same_breaker(chaos):
    scorer = chaos(workers=1, breaker_window=8, breaker_min_items=4)
    ok, raised = Item("p", "ok", {}), Item("p", "raise", {})
    scorer.score("chaos", [ok] * 3 + [raised] * 2)
    assert scorer.quarantined() == {}, "2 of 5 is not more than half"
    scorer.score("chaos", [raised] * 2)
    assert scorer.quarantined() == {
        "chaos": "env 'chaos' quarantined: 4 of its last 7 items errored (exception 4)"
    }
    assert scorer.metrics()["envs/chaos/quarantined"] == 1


def test_breaker_min_items_above_the_window_is_refused():
    with pytest.raises(ValidationError, match="breaker_min_items \\(65\\) must be at most"):
        EnvSpec(name="x", path=CHAOS, breaker_min_items=65)
