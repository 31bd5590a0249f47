"""The samples log (``orchestrator.samples``): one line per completion with its provenance,
errors as errors, rotated into gzip segments, bounded, kept exactly once per step through
resumes and trainer restarts (also when the rewind reaches into a closed segment), and read
back by ``caravela samples``. Real ``Rollout``s of real protocol objects, real files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from inference_server.protocol import Completion, GenerateRequest, GenerateResult
from orchestrator import samples
from orchestrator.cli import main as cli
from orchestrator.config import ConfigError, load_config
from orchestrator.data import Prompt
from orchestrator.record import Recorder
from orchestrator.rollout import Rollout, build_batch
from orchestrator.trackers import LoggingConfig
from reward_envs.protocol import RewardResult

G = 4


def rollout(step: int, text: str = "The answer is 3.") -> Rollout:
    """Four groups of G completions: group 0 mixed rewards (trained), group 1 all right (zero
    variance: not trained), groups 2 and 3 (one prompt drawn twice: ``<id>``, ``<id>#2``)
    with a verifier error among their scores (not trained)."""
    prompts = [
        Prompt(id=f"p{step}-{i}", text="Q: 1+2 A: ", env="arith", fields={"answer": "3"})
        for i in range(3)
    ]
    prompts.append(prompts[-1])
    requests = [
        GenerateRequest(request_id=p.id + ("#2" if i == 3 else ""), prompt_ids=[1])
        for i, p in enumerate(prompts)
    ]
    results = [
        GenerateResult(
            request_id=req.request_id,
            completions=[
                Completion(
                    token_ids=list(range(5 + j)),
                    text=f"{text} ({req.request_id}/{j})",
                    logprobs=[-1.0] * (5 + j),
                    finish_reason="length" if j == G - 1 else "stop",
                    policy_version=step,
                    engine_id=f"engine-{j % 2}",
                )
                for j in range(G)
            ],
        )
        for req in requests
    ]

    def scored(x: float) -> RewardResult:
        return RewardResult(x, None, None, {}, "arith", "build-abc", "0:1")

    failed = RewardResult(None, "TimeoutError: 10 s", "timeout", {}, "arith", "build-abc", "0:1")
    scores = [[scored(float(j % 2)) for j in range(G)], [scored(1.0)] * G]
    scores += [[failed] + [scored(1.0)] * (G - 1) for _ in range(2)]
    return Rollout(prompts, requests, results, scores)


def test_every_completion_is_logged_with_its_provenance_and_errors_stay_errors(tmp_path):
    log = samples.SamplesLog.open(tmp_path, LoggingConfig(), 0)
    r = rollout(7)
    log.write(7, r)
    log.close()
    recs = list(samples.read(tmp_path, step=7))
    assert len(recs) == 4 * G
    first = recs[0]
    assert first == {
        "step": 7,
        "request": "p7-0",
        "prompt": "p7-0",
        "sample": 0,
        "env": "arith",
        "env_build": "build-abc",
        "policy_version": 7,
        "engine": "engine-0",
        "score": 0.0,
        "error": None,
        "tokens": 5,
        "finish": "stop",
        "trained": True,
        "text": "The answer is 3. (p7-0/0)",
    }
    # the prompt drawn twice: two groups, the second's request id is <id>#2
    assert [x["request"] for x in recs[::G]] == ["p7-0", "p7-1", "p7-2", "p7-2#2"]
    assert {x["prompt"] for x in recs[2 * G :]} == {"p7-2"}
    errors = [x for x in recs if x["error"] is not None]
    assert len(errors) == 2  # one per erroring group, recorded as the error, never a 0
    assert all(x["score"] is None for x in errors)
    assert errors[0]["error"] == {"kind": "timeout", "message": "TimeoutError: 10 s"}
    # trained: what build_batch kept (group 0 only: group 1 has no variance, 2-3 errored)
    batch, stats = build_batch(7, r, load_config())
    assert batch is not None
    assert {f"{x['request']}/{x['sample']}" for x in recs if x["trained"]} == {
        s.sample_id for s in batch.samples
    }
    assert len(recs) == stats["items_scored"] + stats["reward_errors"]
    assert recs[G - 1]["finish"] == "length" and recs[G - 1]["tokens"] == 5 + G - 1


def test_zero_variance_groups_are_trained_when_not_dropped(tmp_path):
    log = samples.SamplesLog.open(tmp_path, LoggingConfig(), 0, drop_zero_variance=False)
    r = rollout(0)
    log.write(0, r)
    log.close()
    trained = {x["request"] for x in samples.read(tmp_path) if x["trained"]}
    assert trained == {"p0-0", "p0-1"}
    cfg = load_config(overrides=["advantage.drop_zero_variance=false"])
    batch, _ = build_batch(0, r, cfg)
    assert {s.sample_id.split("/")[0] for s in batch.samples} == trained


def test_text_is_clipped_head_and_tail_or_left_out(tmp_path):
    long = "x" * 3000 + " so the answer is 42"
    cfg = LoggingConfig(samples_text_chars=100)
    log = samples.SamplesLog.open(tmp_path / "a", cfg, 0)
    log.write(0, rollout(0, text=long))
    log.close()
    text = next(samples.read(tmp_path / "a"))["text"]
    assert text.startswith("x" * 50) and text.endswith("answer is 42 (p0-0/0)")
    assert f"…[{len(long) + len(' (p0-0/0)') - 100} chars]…" in text
    log = samples.SamplesLog.open(tmp_path / "b", LoggingConfig(samples_text_chars=0), 0)
    log.write(0, rollout(0))
    log.close()
    assert "text" not in next(samples.read(tmp_path / "b"))


def small(**kw: float) -> LoggingConfig:
    """Rotation after ~4 steps of ``rollout(step, text=...)`` (about 3 KB per step)."""
    return LoggingConfig(samples_rotate_mb=12_000 / 2**20, **kw)


def run_steps(log: samples.SamplesLog, steps: range) -> None:
    for step in steps:
        log.write(step, rollout(step, text="work " * 20))


def test_the_log_rotates_into_gzip_segments_that_hold_whole_steps(tmp_path):
    log = samples.SamplesLog.open(tmp_path, small(samples_max_mb=0), 0)
    run_steps(log, range(30))
    log.close()
    closed = samples.segments(tmp_path / "samples")
    assert len(closed) >= 5
    steps_seen: list[int] = []
    for first, last, path in closed:
        with gzip.open(path, "rt") as f:
            steps = sorted({json.loads(x)["step"] for x in f})
        assert steps == list(range(first, last + 1))
        steps_seen += steps
        assert path.stat().st_size < 12_000 / 4  # compressed
    current = (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()
    steps_seen += sorted({json.loads(x)["step"] for x in current})
    assert steps_seen == list(range(30))  # every step once, none split
    for step in (0, 13, 29):  # the reader finds a step in a segment and in the current file
        assert len(list(samples.read(tmp_path, step=step))) == 4 * G
    assert len(list(samples.read(tmp_path))) == 30 * 4 * G
    assert samples.last_step(tmp_path) == 29


def test_the_directory_stays_under_samples_max_mb(tmp_path):
    said: list[str] = []
    cfg = small(samples_max_mb=36_000 / 2**20)
    log = samples.SamplesLog.open(tmp_path, cfg, 0, log=said.append)
    run_steps(log, range(400))
    log.close()
    assert samples.size(tmp_path / "samples") <= 36_000
    closed = samples.segments(tmp_path / "samples")
    assert closed[0][0] > 0 and closed[-1][1] < 399  # the oldest went, the newest stayed
    assert samples.last_step(tmp_path) == 399
    assert said and "logging.samples_max_mb" in said[0] and "samples-0-" in said[0]
    assert not list(samples.read(tmp_path, step=0))


def test_samples_max_mb_must_leave_room_for_a_segment():
    with pytest.raises(ConfigError, match="samples_max_mb = 10 leaves no room"):
        load_config(overrides=["logging.samples_rotate_mb=8", "logging.samples_max_mb=10"])


def superseded(run_dir: Path) -> list[dict]:
    with gzip.open(run_dir / "samples" / "samples.superseded.jsonl.gz", "rt") as f:
        return [json.loads(x) for x in f]


def test_rewind_into_a_closed_segment_keeps_every_step_once(tmp_path):
    log = samples.SamplesLog.open(tmp_path, small(samples_max_mb=0), 0)
    run_steps(log, range(20))
    closed = samples.segments(tmp_path / "samples")
    first, last, _ = closed[-2]  # a checkpoint older than the last rotation, mid-segment
    back = first + 1
    assert back <= last
    log.rewind(back)
    moved = superseded(tmp_path)
    assert sorted({x["step"] for x in moved}) == list(range(back, 20))
    assert len(moved) == (20 - back) * 4 * G
    assert samples.last_step(tmp_path) == back - 1
    run_steps(log, range(back, 25))  # the redone steps, and on
    log.close()
    logged = [x["step"] for x in samples.read(tmp_path)]
    assert sorted(set(logged)) == list(range(25))
    assert len(logged) == 25 * 4 * G  # each step exactly once
    assert logged == sorted(logged)  # segments and current file in step order


def test_a_crash_mid_rotation_or_mid_line_leaves_each_step_once(tmp_path):
    log = samples.SamplesLog.open(tmp_path, LoggingConfig(), 0)
    run_steps(log, range(3))
    log.close()
    directory = tmp_path / "samples"
    current = directory / "samples.jsonl"
    lines = current.read_text().splitlines()
    # a rotation that wrote its segment and died before removing the current file
    with gzip.open(directory / "samples-0-2.jsonl.gz", "wt") as f:
        f.writelines(x + "\n" for x in lines)
    with open(current, "a") as f:  # and a step 3 cut off mid-line
        f.write(lines[0].replace('"step": 0', '"step": 3')[:40])
    log = samples.SamplesLog.open(tmp_path, small(samples_max_mb=0), 3)
    run_steps(log, range(3, 5))
    log.close()
    logged = [x["step"] for x in samples.read(tmp_path)]
    assert logged == sorted(logged) and len(logged) == 5 * 4 * G


def metrics(r: Rollout, step: int) -> dict[str, float]:
    _, stats = build_batch(step, r, load_config())
    return stats | {"step": float(step), "step_seconds": 0.1}


def test_the_recorder_keeps_samples_in_step_with_metrics_on_resume_and_restart(tmp_path):
    cfg = load_config(
        overrides=[
            "logging.trackers=[]",
            f"logging.samples_rotate_mb={12_000 / 2**20}",
            f"output_dir='{tmp_path}'",
        ]
    )
    quiet = dict(steps=12, on_ray=False, log=lambda *_: None, config=cfg)
    with Recorder(tmp_path, 0, **quiet) as rec:
        for step in range(8):
            r = rollout(step)
            rec.step(step, r.prompts, metrics(r, step), rollout=r)
        rec.rewind(3)  # a trainer group formed again from the checkpoint of step 3
        for step in range(3, 10):
            r = rollout(step)
            rec.step(step, r.prompts, metrics(r, step), rollout=r)
    with Recorder(tmp_path, 6, **quiet) as rec:  # resumed from the checkpoint of step 6
        for step in range(6, 12):
            r = rollout(step)
            rec.step(step, r.prompts, metrics(r, step), rollout=r)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    logged = list(samples.read(tmp_path))
    assert samples.segments(tmp_path / "samples")  # some steps are in closed segments
    for step in range(12):
        mine = [x for x in logged if x["step"] == step]
        m = lines[step]
        assert len(mine) == m["items_scored"] + m["reward_errors"]
        assert sum(x["error"] is not None for x in mine) == m["reward_errors"]
        assert len({x["request"] for x in mine if x["trained"]}) == m["groups_kept"]
        assert [x["prompt"] for x in mine[::G]] == prompts[step]["prompts"]
    redone = [x["step"] for x in superseded(tmp_path)]
    assert sorted(set(redone)) == list(range(3, 10))
    assert len(redone) == (5 + 4) * 4 * G  # steps 3-7 once, then 6-9 again


def test_logging_samples_false_writes_none_but_still_supersedes_on_resume(tmp_path):
    log = samples.SamplesLog.open(tmp_path, LoggingConfig(), 0)
    run_steps(log, range(4))
    log.close()
    cfg = load_config(overrides=["logging.trackers=[]", "logging.samples=false"])
    with Recorder(tmp_path, 2, 4, False, lambda *_: None, cfg) as rec:
        r = rollout(2)
        rec.step(2, r.prompts, metrics(r, 2), rollout=r)
    assert sorted({x["step"] for x in samples.read(tmp_path)}) == [0, 1]
    assert sorted({x["step"] for x in superseded(tmp_path)}) == [2, 3]


def test_caravela_samples_prints_a_step(tmp_path, capsys):
    log = samples.SamplesLog.open(tmp_path, small(samples_max_mb=0), 0)
    run_steps(log, range(10))
    log.close()
    assert samples.segments(tmp_path / "samples")[0][0] == 0
    assert cli(["samples", str(tmp_path), "--step", "1"]) == 0  # from a segment
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 * G
    assert out[0].startswith("step 1  p1-0[0]  arith@build-abc  v1 engine-0  score 0  trained")
    assert "error timeout" in out[2 * G] and "not trained" in out[2 * G]
    assert cli(["samples", str(tmp_path), "--json"]) == 0  # the last step, as logged
    out = capsys.readouterr().out.splitlines()
    assert {json.loads(x)["step"] for x in out} == {9} and len(out) == 4 * G
    assert cli(["samples", str(tmp_path), "--step", "4", "--env", "math"]) == 1
    assert "no samples of step 4 scored by env 'math'" in capsys.readouterr().err
    assert cli(["samples", str(tmp_path / "nothing")]) == 1
    assert "no samples in" in capsys.readouterr().err
