"""Env pools on Ray pool hosts, on a local cluster and on two trainer nodes (token auth on):
every env's pools on a node run in its one host process; an env's replicas go to the nodes in
turn; a dead host's replicas are replaced on its node and their items re-sent, none lost.
``PoolHost`` itself, without Ray: pools started side by side."""

import os
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


@pytest.fixture
def trainer_cluster(ray_token, tmp_path):
    import ray

    from orchestrator.cluster import start_local

    ray.shutdown()
    start_local(tmp_path / "run", num_cpus=4, resources={"trainer_node": 1}, dashboard=False)
    yield
    ray.shutdown()


def test_a_killed_host_loses_no_item_and_its_envs_are_replaced(trainer_cluster, tmp_path):
    """Three pools of two envs on the one trainer node run in one host process, their workers
    its children. Killing that host mid-call takes them all: the call in flight re-sends its
    items to fresh pools on a fresh host, each item scored once; the other env's replica is
    lost too, and replaced on its env's next call."""
    import psutil
    import ray

    from reward_envs.scorer import RayScorer

    scorer = RayScorer(
        [
            EnvSpec(name="arith", path=ARITH_ENV, workers=1),
            EnvSpec(name="chaos", path=CHAOS, workers=1, replicas=2),
        ],
        log_dir=tmp_path / "logs",
    )
    (ok,) = scorer.score("arith", [Item("Q: 1+1+1 A: ", "The answer is 3.", {"answer": "3"})])
    assert ok.score == 1.0 and ok.env == "arith"

    replicas = [*scorer.replicas["arith"], *scorer.replicas["chaos"]]
    assert len({r.host.actor for r in replicas}) == 1, "one host on one trainer node"
    host = replicas[0].host
    pid = ray.get(host.actor.pid.remote())
    workers = [w for r in replicas for w in ray.get(host.actor.pids.remote(r.key))]
    assert len(set(workers)) == 3
    assert {psutil.Process(w).ppid() for w in workers} == {pid}
    assert psutil.Process(pid).cmdline()[0].startswith("ray::PoolHost")

    killer = threading.Timer(0.3, os.kill, (pid, 9))
    killer.start()
    t0 = time.monotonic()
    results = scorer.score("chaos", [Item("p", "slow:0.01", {"i": i}) for i in range(200)])
    killer.join()
    assert time.monotonic() - t0 > 0.3, "the host died before scoring started"
    assert len(results) == 200 and all(r.score == 1.0 for r in results)
    assert {int(r.worker.split(":")[1]) for r in results}.isdisjoint(workers), "a dead pool's"
    # both chaos replicas were on the host: both replaced, on a fresh host
    fresh = scorer.replicas["chaos"]
    assert len(fresh) == 2 and not set(fresh) & set(replicas)
    assert fresh[0].host is fresh[1].host and fresh[0].host is not host
    fresh_pid = ray.get(fresh[0].host.actor.pid.remote())
    assert fresh_pid != pid
    m = scorer.metrics()
    assert m["restarts/pool"] == 2 and m["envs/chaos/replicas_lost"] == 2
    # both shares were in flight (~1 s each): all 200 re-sent, and scored once, by the fresh
    assert m["envs/chaos/resent"] == 200 and m["envs/chaos/scored"] == 200
    # arith's replica died with the host: counted lost now, replaced on arith's next call
    assert m["envs/arith/replicas_alive"] == 0 and m["envs/arith/replicas_lost"] == 1
    (again,) = scorer.score("arith", [Item("Q: 2+2 A: ", "The answer is 4.", {"answer": "4"})])
    assert again.score == 1.0
    (arith,) = scorer.replicas["arith"]
    assert arith.host is fresh[0].host
    m = scorer.metrics()
    assert m["envs/arith/replicas_alive"] == 1 and m["envs/arith/replicas_lost"] == 1
    assert m["envs/arith/replicas_restarted"] == 1 and m["restarts/pool"] == 3
    assert m["envs/arith/resent"] == 0, "arith had nothing in flight"
    scorer.close()  # ends the host too
    deadline = time.monotonic() + 20
    while psutil.pid_exists(fresh_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(fresh_pid)


def test_a_pool_host_starts_its_pools_side_by_side(tmp_path):
    """``PoolHost`` as a plain object (no Ray): pools started from threads start at once, each
    scores its own env, and a key closed while its pool starts gets that pool stopped."""
    import psutil

    from reward_envs.builder import prepare
    from reward_envs.hosts import PoolHost
    from reward_envs.manifest import load_manifest

    manifest, built = load_manifest(CHAOS), prepare(CHAOS, "process")
    host = PoolHost()
    keys = [f"chaos#{i}" for i in range(4)]
    starts = [
        threading.Thread(target=host.start, args=(k, manifest, built, 1, None, tmp_path))
        for k in [*keys, "gone#0"]
    ]
    host.close("gone#0")  # closed before it was up
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    try:
        assert host.keys() == keys
        pids = {k: host.pids(k) for k in keys}
        assert len({p for ps in pids.values() for p in ps}) == 4
        assert {psutil.Process(p).ppid() for ps in pids.values() for p in ps} == {os.getpid()}
        for k in keys:
            scored, counters = host.score_counted(k, [Item("p", "ok", {})])
            assert scored[0].score == 1.0 and counters["items"] == 1
    finally:
        for k in keys:
            host.close(k)
    assert host.keys() == []


@pytest.mark.slow
def test_replicas_spread_over_trainer_nodes_and_a_host_comes_back_on_its_node(ray_token, tmp_path):
    """Two trainer nodes (``cluster_utils.Cluster``: raylets on this machine) and a head with
    none: an env's 4 replicas go to the nodes in turn, one host per node, each with its pools'
    workers as children. Killing one node's host replaces its replicas on a fresh host on that
    same node, every item scored once; the other node's host serves on untouched."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from reward_envs.scorer import RayScorer

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes = [c.add_node(num_cpus=2, resources={"trainer_node": 1}) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="warning")
        scorer = RayScorer(
            [EnvSpec(name="chaos", path=CHAOS, workers=1, replicas=4, restart_backoff_s=0.1)],
            log_dir=tmp_path / "logs",
        )
        replicas = scorer.replicas["chaos"]
        hosts = {r.host.node: r.host for r in replicas}
        assert set(hosts) == {n.node_id for n in nodes}
        assert replicas[0].host.node != replicas[1].host.node, "placed in turn"
        assert sorted(sum(r.host is h for r in replicas) for h in hosts.values()) == [2, 2]
        pids = {node: ray.get(h.actor.pid.remote()) for node, h in hosts.items()}
        for r in replicas:
            (w,) = ray.get(r.host.actor.pids.remote(r.key))
            assert psutil.Process(w).ppid() == pids[r.host.node]

        victim = nodes[0].node_id
        killer = threading.Timer(0.3, os.kill, (pids[victim], 9))
        killer.start()
        results = scorer.score("chaos", [Item("p", "slow:0.01", {"i": i}) for i in range(200)])
        killer.join()
        assert len(results) == 200 and all(r.score == 1.0 and r.error is None for r in results)
        now = scorer.replicas["chaos"]
        assert len(now) == 4
        fresh = {r.host for r in now if r.host.node == victim}
        (back,) = fresh  # the victim's two replicas, on one fresh host on the same node
        assert back is not hosts[victim] and ray.get(back.actor.pid.remote()) != pids[victim]
        assert sum(r.host is hosts[nodes[1].node_id] for r in now) == 2, "the other untouched"
        m = scorer.metrics()
        assert m["envs/chaos/replicas_lost"] == 2 and m["envs/chaos/replicas_restarted"] == 2
        assert m["envs/chaos/replicas_alive"] == 4
        # the victim's two shares (50 items each, ~0.5 s) were in flight: re-sent, scored once
        assert m["envs/chaos/resent"] == 100 and m["envs/chaos/scored"] == 200
        scorer.close()
    finally:
        ray.shutdown()
        c.shutdown()
