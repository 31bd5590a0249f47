"""Streaming scoring (``orchestrator.scoring.Streaming``) through real env pools: groups are
scored while later ones are still being generated, envs in parallel, each completion
exactly once, and a failing env fails the step only after the others finished."""

import threading
import time
from pathlib import Path

import pytest

from common.paths import ARITH_ENV
from inference_server.protocol import Completion, GenerateResult
from orchestrator.data import Prompt
from orchestrator.scoring import Streaming, score_groups
from reward_envs.config import EnvSpec
from reward_envs.scorer import LocalScorer

CHAOS = Path(__file__).parents[1] / "reward_envs" / "envs" / "chaos"


def result(rid: str, texts: list[str]) -> GenerateResult:
    return GenerateResult(
        request_id=rid,
        completions=[
            Completion(
                token_ids=[5],
                text=t,
                logprobs=[-1.0],
                finish_reason="stop",
                policy_version=0,
                engine_id="e",
            )
            for t in texts
        ],
    )


@pytest.fixture
def scorer(tmp_path):
    s = LocalScorer(
        [
            EnvSpec(name="arith", path=ARITH_ENV, workers=2),
            EnvSpec(name="chaos", path=CHAOS, workers=2),
            EnvSpec(name="chaos2", path=CHAOS, workers=2),
        ],
        log_dir=tmp_path,
    )
    yield s
    s.close()


def prompts(n: int) -> list[Prompt]:
    return [
        Prompt(id=f"a{i}", text="Q: 1+1+1 A: ", env="arith", fields={"answer": "3"})
        if i % 2 == 0
        else Prompt(id=f"c{i}", text="p", env="chaos", fields={})
        for i in range(n)
    ]


def test_groups_are_scored_while_later_ones_are_generated(scorer):
    """A generator handing over one group every 0.3 s: the first groups' rewards are in
    before the last group is handed over (scoring overlaps generation)."""
    ps = prompts(8)
    stream = Streaming(scorer, ps, [p.id for p in ps])
    seen_scored_early = False
    try:
        for i, p in enumerate(ps):
            texts = ["The answer is 3.", "The answer is 4."] if p.env == "arith" else ["slow:0.2"]
            stream.add(result(p.id, texts))
            time.sleep(0.3)
            if i == len(ps) - 1:
                with stream.lock:
                    seen_scored_early = sum(s is not None for s in stream.scores) >= 4
        groups = stream.wait()
    finally:
        stream.close()
    assert seen_scored_early, "nothing was scored before the last group was handed over"
    assert [[r.score for r in g] for g in groups] == [
        [1.0, 0.0] if p.env == "arith" else [1.0] for p in ps
    ]
    assert [g[0].env for g in groups] == [p.env for p in ps]


def test_envs_score_in_parallel(scorer):
    """Two envs each given 0.7 s of work at once: their pool calls overlap."""
    ps = [
        Prompt(id="c0", text="p", env="chaos", fields={}),
        Prompt(id="a0", text="p", env="chaos2", fields={}),
    ]
    t0 = time.perf_counter()
    stream = Streaming(scorer, ps, ["c0", "a0"])
    try:
        stream.add(result("c0", ["slow:0.7", "slow:0.7"]))  # two workers: 0.7 s
        stream.add(result("a0", ["slow:0.7"] * 2))
        groups = stream.wait()
    finally:
        stream.close()
    took = time.perf_counter() - t0
    assert [[r.score for r in g] for g in groups] == [[1.0, 1.0], [1.0, 1.0]]
    # the two calls overlapped: the wall time is well below their summed durations
    assert stream.busy_s >= 1.4 and took < stream.busy_s - 0.4, (took, stream.busy_s)


def test_concurrent_adds_score_each_completion_once(scorer):
    """Results handed over from several threads at once (as the router's thread does while
    lanes drain): every completion scored exactly once, in request order."""
    ps = prompts(40)
    stream = Streaming(scorer, ps, [p.id for p in ps])

    def hand(part: list[Prompt]) -> None:
        for p in part:
            stream.add(result(p.id, ["ok", "zero"] if p.env == "chaos" else ["The answer is 3."]))

    try:
        threads = [threading.Thread(target=hand, args=(ps[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        groups = stream.wait()
    finally:
        stream.close()
    assert [[r.score for r in g] for g in groups] == [
        [1.0, 0.0] if p.env == "chaos" else [1.0] for p in ps
    ]
    counters = scorer.stats()
    assert counters["arith"]["items"] == 20 and counters["chaos"]["items"] == 40
    with pytest.raises(ValueError, match="handed over twice"):
        again = Streaming(scorer, ps[:1], [ps[0].id])
        try:
            again.add(result(ps[0].id, ["The answer is 3."]))
            again.add(result(ps[0].id, ["The answer is 3."]))
        finally:
            again.close()


def test_a_failing_env_fails_the_step_after_the_others_finished(scorer):
    """An env the scorer cannot score (here: not in the run) raises from ``wait``; the other
    env's call was not cut short."""
    ps = [
        Prompt(id="x", text="p", env="missing", fields={}),
        Prompt(id="c", text="p", env="chaos", fields={}),
    ]
    stream = Streaming(scorer, ps, ["x", "c"])
    try:
        stream.add(result("c", ["slow:0.5"]))
        stream.add(result("x", ["ok"]))
        with pytest.raises(KeyError, match="no env named 'missing'"):
            stream.wait()
        with stream.lock:
            assert stream.scores[1] is not None and stream.scores[1][0].score == 1.0
    finally:
        stream.close()


def test_score_groups_is_streaming_with_everything_at_hand(scorer):
    ps = prompts(4)
    results = [result(p.id, ["The answer is 3."] if p.env == "arith" else ["nan"]) for p in ps]
    groups = score_groups(scorer, ps, results)
    assert [g[0].score for g in groups] == [1.0, None, 1.0, None]
    assert groups[1][0].error_kind == "bad_value"  # an error stays an error, never a 0
