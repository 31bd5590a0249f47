"""The supervised env pool, with real worker processes running misbehaving test envs."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from reward_envs.builder import process_env
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool, EnvStartError
from reward_envs.protocol import Item

ENVS = Path(__file__).parent / "envs"


def pool_for(name, workers=2, **kw):
    d = ENVS / name
    return EnvPool(load_manifest(d), process_env(d), workers=workers, **kw)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    pool = pool_for("chaos", log_dir=tmp_path_factory.mktemp("logs"))
    yield pool
    pool.close()


def items(*completions, **fields):
    return [Item("p", c, dict(fields)) for c in completions]


def test_every_failure_is_a_named_error_never_a_zero(chaos):
    cases = {
        "ok": (1.0, None),
        "zero": (0.0, None),
        "nan": (None, "bad_value"),
        "inf": (None, "bad_value"),
        "str": (None, "bad_value"),
        "bool": (None, "bad_value"),
        "none": (None, "bad_value"),
        "bad_info": (None, "bad_value"),
        "raise": (None, "exception"),
        "sleep": (None, "timeout"),
        "busy": (None, "timeout"),
        "exit": (None, "crash"),
        "print": (1.0, None),
    }
    before = chaos.stats["errors"]
    results = chaos.score(items(*cases))
    for (what, (score, kind)), r in zip(cases.items(), results, strict=True):
        assert (r.score, r.error_kind) == (score, kind), (what, r)
        assert (r.error is None) == (kind is None)
        assert r.env == "chaos" and len(r.build_hash) == 16 and ":" in r.worker
    by_kind = {what: r.error for what, r in zip(cases, results, strict=True)}
    assert "ValueError: the reference answer is malformed" in by_kind["raise"]
    assert "nan" in by_kind["nan"] and "'1.0'" in by_kind["str"]
    assert "timed out after 1 s" in by_kind["sleep"]
    assert chaos.stats["errors"] - before == 10
    assert chaos.stats["errors/timeout"] >= 2 and chaos.stats["restarts"] >= 3


def test_info_travels_with_the_score(chaos):
    (r,) = chaos.score(items("info:x"))
    assert r.score == 0.5 and r.info == {"seen": "info:x"}


def test_a_crash_is_retried_once_on_a_fresh_worker(chaos, tmp_path):
    (r,) = chaos.score(items("crash_once", marker=str(tmp_path / "m")))
    assert r.score == 1.0 and r.error is None


def test_kill_9_of_workers_mid_batch_loses_and_duplicates_nothing(tmp_path):
    """Busy workers are SIGKILLed at random while 300 items are scored: every item gets
    exactly one result, a score or an error that says it crashed."""
    pool = pool_for("chaos", workers=2, log_dir=tmp_path)
    stop = threading.Event()
    kills = []

    def killer():
        rng = random.Random(0)
        while not stop.is_set():
            time.sleep(0.05)
            busy = [w.pid for w in pool.workers if w.ready and w.job is not None]
            if not busy:
                continue
            pid = rng.choice(busy)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
            except ProcessLookupError:
                pass

    t = threading.Thread(target=killer)
    batch = [Item("p", "slow:0.002", {"i": i}) for i in range(300)]
    t.start()
    try:
        results = pool.score(batch)
    finally:
        stop.set()
        t.join()
        pool.close()
    assert len(results) == len(batch)
    assert all((r.score == 1.0) != (r.error_kind == "crash") for r in results)
    assert len(kills) >= 5 and pool.stats["restarts"] >= 5
    assert sum(r.score == 1.0 for r in results) > 200  # a crash costs an item only twice over


def test_trl_reward_functions_are_used_as_is(tmp_path):
    pool = pool_for("trl_style", log_dir=tmp_path)
    try:
        out = pool.score([Item("p", "x" * n, {"target": 2}) for n in range(10)])
        assert [r.score for r in out] == [float(abs(n - 2)) for n in range(10)]
        # one hung item in a batch: its neighbours are retried alone and scored
        mixed = [Item("p", c, {"target": 0}) for c in ("ab", "hang", "abcd", "a")]
        pool.timeout_s = 0.5
        out = pool.score(mixed)
        assert [r.score for r in out] == [2.0, None, 4.0, 1.0]
        assert out[1].error_kind == "timeout"
    finally:
        pool.close()


def test_batch_api_wrong_result_count_is_an_error(tmp_path):
    pool = pool_for("batched", log_dir=tmp_path)
    try:
        ok = pool.score([Item("p", c, {"answer": "a"}) for c in "aab"])
        assert [r.score for r in ok] == [1.0, 1.0, 0.0]
        bad = pool.score([Item("p", c, {"answer": "a"}) for c in ("a", "short")])
        assert all(r.error_kind == "bad_value" and "2 items" in r.error for r in bad)
    finally:
        pool.close()


def test_unimportable_env_is_a_start_error_naming_it(tmp_path):
    env = tmp_path / "broken"
    env.mkdir()
    (env / "caravela-env.toml").write_text(
        'name = "broken"\nversion = "1"\nentry_point = "env:score"\nisolation = "process"\n'
    )
    (env / "env.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(EnvStartError, match=r"env 'broken'.*not_a_module_anywhere"):
        EnvPool(load_manifest(env), process_env(env), log_dir=tmp_path)


def test_fields_that_are_not_json_are_refused_up_front(chaos):
    with pytest.raises(ValueError, match="item 0 for env 'chaos': fields must be JSON"):
        chaos.score([Item("p", "ok", {"x": object()})])


def test_a_worker_stuck_in_a_hung_scorer_exits_when_its_pool_is_killed(tmp_path):
    """kill -9 of the process owning the pool (a Ray pool host, in a run) while a worker is
    stuck: the worker never reads stdin again, so it watches its parent and exits."""
    import subprocess
    import sys

    script = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from tests.reward_envs.test_pool import pool_for, items
pool = pool_for("chaos", workers=1, timeout_s=600)
print(pool.pids()[0], flush=True)
pool.score(items("sleep"))
"""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(owner.stdout.readline())
    time.sleep(1.0)  # the item is in the worker's hands
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as f:  # a zombie has exited too
            if f.read().split(") ")[1].startswith("Z"):
                break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"worker {worker} outlived its pool by 15 s")
