"""Faults mid-run, on a real local Ray cluster (token auth on) with the tiny model and env
venvs: an env worker, the env pool host and an engine actor SIGKILLed while the run uses
them, and an env that hangs on some items and returns NaN on others. The run goes on to the
end, and every step scores exactly ``prompts_per_step x group_size`` completions, each once,
each with its own result; the faulty items are errors kept out of the loss, never zeros.

How it is watched: three class methods (``EngineRouter.generate``, ``RayScorer.score``,
``TrainerGroup.train_step``) are wrapped to call the real one and keep what went in and came
out, and the kills are fired from those wrappers at a chosen step. Nothing is mocked. The
test env (``envs/faulty``) scores like ``arith`` and echoes the item it scored, so each result
can be matched to its completion.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import paths
from orchestrator.config import RunConfig, load_config
from reward_envs.builtin.arith.env import score as arith_score

pytestmark = pytest.mark.slow

FAULTY_ENV = Path(__file__).parent / "envs" / "faulty"
N, G = 8, 8  # prompts per step, completions per prompt


@pytest.fixture(scope="module")
def ray_cluster(ray_token, tmp_path_factory):
    """One local cluster for the module: its node is both an inference and a trainer node."""
    import ray

    from orchestrator.cluster import start_local

    start_local(
        tmp_path_factory.mktemp("cluster"),
        num_cpus=16,
        resources={"inference_node": 1, "trainer_node": 1},
        dashboard=False,
    )
    yield
    ray.shutdown()


def rows(path: Path, n: int) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def write_jsonl(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def actor_pid(handle: Any) -> int:
    import ray

    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid())))


@dataclass
class Recorder:
    """What went through the router, the env scorer and the trainer group, step by step.

    ``faults[(what, step)]`` is called (with the router or scorer) just before that step's
    ``generate`` or ``score`` call and returns what a thread then does during the call."""

    faults: dict[tuple[str, int], Callable[[Any], Callable[[], None]]] = field(default_factory=dict)
    step: int = -1
    router: Any = None
    scorer: Any = None
    generated: dict[int, list[Any]] = field(default_factory=dict)
    scored: list[tuple[int, str, list[Any], list[Any]]] = field(default_factory=list)
    batches: dict[int, Any] = field(default_factory=dict)
    env_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def during(self, what: str, target: Any, call: Callable[[], Any]) -> Any:
        fault = self.faults.pop((what, self.step), None)
        if fault is None:
            return call()
        action = fault(target)

        def guarded() -> None:
            try:
                action()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)

        t = threading.Thread(target=guarded)
        t.start()
        try:
            return call()
        finally:
            t.join()


@pytest.fixture
def record(monkeypatch):
    from inference_server.router import EngineRouter
    from reward_envs.scorer import RayScorer
    from trainer.group import TrainerGroup

    rec = Recorder()
    generate, score, train_step = EngineRouter.generate, RayScorer.score, TrainerGroup.train_step

    def watched_generate(router, requests, on_result=None):
        if all(r.request_id.startswith("eval/") for r in requests):  # held-out evaluation
            return generate(router, requests, on_result)
        rec.router = router
        rec.step += 1  # one generate call per step (synchronous run, no refill rounds)
        results = rec.during("generate", router, lambda: generate(router, requests, on_result))
        rec.generated[rec.step] = results
        return results

    def watched_score(scorer, env, items):
        rec.scorer = scorer
        results = rec.during("score", scorer, lambda: score(scorer, env, items))
        rec.scored.append((rec.step, env, list(items), results))
        rec.env_metrics[rec.step] = scorer.metrics()
        return results

    def watched_train_step(group, batch):
        rec.batches[batch.step] = batch
        return train_step(group, batch)

    monkeypatch.setattr(EngineRouter, "generate", watched_generate)
    monkeypatch.setattr(RayScorer, "score", watched_score)
    monkeypatch.setattr(TrainerGroup, "train_step", watched_train_step)
    return rec


def configure(out: Path, *sets: str) -> RunConfig:
    return load_config(
        overrides=[
            f"output_dir='{out}'",
            f"rollout.prompts_per_step={N}",
            f"rollout.group_size={G}",
            "eval.num_prompts=8",
            "eval.k=2",
            "checkpoint.every_steps=0",
            "trainer.cpus_per_rank=1",
            *sets,
        ]
    )


def run(cfg: RunConfig) -> None:
    from orchestrator.loop import run as run_loop

    run_loop(cfg, log=lambda *_: None)  # on the module's cluster, which it leaves running


def check_every_step(
    rec: Recorder,
    out: Path,
    prompts: dict[str, dict[str, Any]],
    heldout: set[str],
    steps: int,
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Each step: the N prompts logged were generated once each with G completions; exactly
    those N x G completions were scored, each once, each result the env's answer for that very
    completion; the metrics count exactly them; the batch trained on is exactly the groups
    with no error and some variance, every completion of them once. Returns the logged steps
    and metrics."""
    assert not rec.errors, rec.errors
    logged, metrics = jsonl(out / "prompts.jsonl"), jsonl(out / "metrics.jsonl")
    assert [s["step"] for s in logged] == list(range(steps))
    assert [m["step"] for m in metrics] == list(range(steps))
    assert sorted(rec.generated) == list(range(steps))
    for s, m in zip(logged, metrics, strict=True):
        step, ids = s["step"], s["prompts"]
        assert len(ids) == len(set(ids)) == N
        texts = [prompts[i]["prompt"] for i in ids]
        assert len(set(texts)) == N and not set(texts) & heldout
        # generated: each prompt once, G completions each
        results = rec.generated[step]
        assert [r.request_id for r in results] == ids
        assert all(len(r.completions) == G for r in results)
        made = Counter(
            (prompts[r.request_id]["prompt"], c.text) for r in results for c in r.completions
        )
        # scored: exactly those N x G completions, each result for its own completion
        train = [
            (env, it, r)
            for st, env, items, res in rec.scored
            if st == step
            for it, r in zip(items, res, strict=True)
            if it.prompt not in heldout
        ]
        assert len(train) == N * G
        assert Counter((it.prompt, it.completion) for _, it, _ in train) == made
        by_prompt: dict[str, list[Any]] = {}
        for env, it, r in train:
            row = prompts[ids[texts.index(it.prompt)]]
            assert r.env == env == row["env"]
            if "fault" in it.fields:
                assert r.score is None and r.error  # an error, never a 0
            else:
                assert r.error is None, r.error
                assert r.score == arith_score(it.prompt, it.completion, row["answer"])
                if env == "faulty":
                    assert r.info == {"prompt": it.prompt, "completion": it.completion}
            by_prompt.setdefault(it.prompt, []).append(r)
        # the metrics count exactly these results
        errors = Counter(f"reward_errors/{r.env}/{r.error_kind}" for _, _, r in train if r.error)
        assert m["reward_errors"] == sum(errors.values())
        assert {k: v for k, v in m.items() if k.startswith("reward_errors/")} == errors
        clean = {
            t: [r.score for r in rs]
            for t, rs in by_prompt.items()
            if all(r.error is None for r in rs)
        }
        scores = [x for v in clean.values() for x in v]
        assert m["reward_mean"] == pytest.approx(sum(scores) / len(scores))
        teach = {t for t, v in clean.items() if len(set(v)) > 1}
        assert m["groups_kept"] == len(teach)
        assert m["groups_zero_variance"] == len(clean) - len(teach)
        # trained on: exactly the teaching groups, every completion once
        batch = rec.batches.get(step)
        if not teach:
            assert batch is None
            continue
        sample_ids = [x.sample_id for x in batch.samples]
        assert len(sample_ids) == len(set(sample_ids)) == G * len(teach)
        assert {i.rsplit("/", 1)[0] for i in sample_ids} == {ids[texts.index(t)] for t in teach}
        assert all(math.isfinite(x.advantage) for x in batch.samples)
    for m in metrics:
        bad = {k: v for k, v in m.items() if not math.isfinite(v)}
        assert not bad, f"step {m['step']}: non-finite metrics {bad}"
    return logged, metrics


# -- kills: an env worker, the env pool host, an engine ---------------------------------------


def kill_env_worker(scorer: Any) -> Callable[[], None]:
    """SIGKILL a worker process of the first pool replica, one of its pool host's children
    running an env worker, while the replica scores."""
    import psutil
    import ray

    replica = scorer.replicas["faulty"][0]
    host = psutil.Process(actor_pid(replica.host.actor))
    workers = [psutil.Process(p) for p in ray.get(replica.host.actor.pids.remote(replica.key))]
    assert len(workers) == 2 and all(p in host.children() for p in workers)
    assert all("caravela_env_worker" in " ".join(p.cmdline()) for p in workers)

    def act() -> None:
        time.sleep(0.05)
        os.kill(workers[0].pid, signal.SIGKILL)

    return act


def kill_pool_host(scorer: Any) -> Callable[[], None]:
    """SIGKILL the pool host process (the cluster's one trainer node has one, holding both
    pool replicas) while both replicas score the step."""
    (host,) = {r.host for r in scorer.replicas["faulty"]}
    pid = actor_pid(host.actor)

    def act() -> None:
        time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    return act


def kill_engine(router: Any) -> Callable[[], None]:
    """SIGKILL an engine's process as soon as it holds requests of this step."""
    victim = sorted(router.alive)[0]
    pid = actor_pid(router.engines[victim])

    def act() -> None:
        deadline = time.monotonic() + 120
        while router.outstanding[victim] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine {victim} was never given requests")
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)

    return act


def test_kills_mid_run_lose_and_double_count_nothing(ray_cluster, record, tmp_path):
    """5 steps on 2 engines and 2 replicas of the faulty env (2 workers each, every item
    10 ms): an env worker is killed in step 1, the pool host (both replicas: one node) in
    step 2, an engine in step 3. The run finishes, every step scored N x G completions once
    each (``check_every_step``), and what happened is counted: a worker restart, two lost
    replicas with their items re-sent, a dead engine with its requests re-queued on the
    other."""
    train = [{**r, "env": "faulty", "delay": 0.01} for r in rows(paths.TINY_TRAIN, 64)]
    heldout = [{**r, "env": "faulty"} for r in rows(paths.TINY_HELDOUT, 8)]
    cfg = configure(
        tmp_path / "run",
        "steps=5",
        f"datasets=[{{path='{write_jsonl(tmp_path / 'train.jsonl', train)}', env='faulty'}}]",
        f"eval.heldout='{write_jsonl(tmp_path / 'heldout.jsonl', heldout)}'",
        f"envs=[{{name='faulty', path='{FAULTY_ENV}', isolation={{type='venv'}}, "
        "workers=2, replicas=2}]",
        "inference.backend={type='transformers', cpus_per_engine=1, engines_per_node=2}",
        # the killed engine's replacement waits past the run's end: the other engine serves
        # the rest alone (a replacement coming back is tests/orchestrator/test_chaos.py's)
        "inference.restart_backoff_s=3600",
    )
    rec = record
    rec.faults = {
        ("score", 1): kill_env_worker,
        ("score", 2): kill_pool_host,
        ("generate", 3): kill_engine,
    }
    run(cfg)
    assert not rec.faults, f"faults never fired: {list(rec.faults)}"
    _, metrics = check_every_step(
        rec,
        Path(cfg.output_dir),
        {r["id"]: r for r in train},
        {r["prompt"] for r in heldout},
        cfg.steps,
    )
    envs = rec.scorer.metrics()
    # the env worker: restarted (it died, not before step 1), its item retried, not an error
    assert rec.env_metrics[0]["envs/faulty/restarts"] == 0
    assert envs["envs/faulty/restarts"] >= 1
    assert envs["envs/faulty/errors"] == 0
    # the pool host: both replicas on it lost, replaced on a fresh host, their shares re-sent
    assert envs["envs/faulty/replicas_alive"] == 2
    assert envs["envs/faulty/replicas_lost"] == 2
    assert envs["envs/faulty/replicas_restarted"] == 2 and envs["restarts/pool"] == 2
    assert envs["envs/faulty/resent"] > 0
    assert len({r.host for r in rec.scorer.replicas["faulty"]}) == 1
    # the engine: died holding requests, which the other engine served
    router = rec.router
    (dead,) = router.restarting  # to be started again after its backoff
    (alive,) = router.alive
    assert not router.dead  # none retired for good
    assert "ActorDiedError" in router.lost[dead]
    assert router.metrics() == {
        "engines/alive": 1.0,
        "engines/dead": 0.0,
        "engines/restarting": 1.0,
        "engines/draining": 0.0,
        "engines/joined": 0.0,
        "engines/left": 0.0,
        "engines/requeued": float(router.requeued),
        "requests_requeued": float(router.requeued),
        "restarts/engine": 1.0,
        "engines/hangs": 0.0,
    }
    assert router.requeued > 0, "the engine died with nothing in flight: nothing was tested"
    assert [m["weight_sync/engines"] for m in metrics] == [2.0, 2.0, 2.0, 1.0, 1.0]
    # the push after the engine died found it gone from the weight-push group: the group was
    # formed again with the live engine and the push repeated (collective, the default)
    assert [m["weight_sync/regrouped"] for m in metrics] == [0.0, 0.0, 0.0, 1.0, 0.0]
    served = [{c.engine_id for r in rec.generated[s] for c in r.completions} for s in range(5)]
    assert served[:3] == [{dead, alive}] * 3 and served[3:] == [{alive}] * 2
    # on-policy throughout: every completion came from the weights of its step
    assert all(m["staleness_max"] == 0 for m in metrics)
    # and the run's own metrics say all of it, step by step
    assert metrics[-1]["engines/restarting"] == 1 and metrics[-1]["requests_requeued"] > 0
    assert [m["envs/faulty/replicas_lost"] for m in metrics] == [0, 0, 2, 2, 2]
    assert metrics[0]["envs/faulty/restarts"] == 0 and metrics[-1]["envs/faulty/restarts"] >= 1


# -- a hung and a NaN reward ------------------------------------------------------------------
