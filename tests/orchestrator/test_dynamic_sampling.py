"""Dynamic sampling (refill of groups that teach nothing) and the stale-sample policy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.protocol import Completion, GenerateRequest, GenerateResult
from orchestrator.config import ConfigError, load_config
from orchestrator.data import Prompt
from orchestrator.rollout import Rollout, handle_stale, merge, teaching_groups
from reward_envs.protocol import RewardResult


def reward(score: float | None) -> RewardResult:
    error = None if score is not None else "boom"
    kind = None if score is not None else "exception"
    return RewardResult(score, error, kind, {}, "arith", "h", "w0")  # type: ignore[arg-type]


def group(i: int, scores: list[float | None], versions: list[int]) -> tuple:
    prompt = Prompt(id=f"p{i}", text="Q", env="arith")
    request = GenerateRequest(request_id=f"p{i}", prompt_ids=[1])
    completions = [
        Completion(
            token_ids=[2],
            text="x",
            logprobs=[-0.1],
            finish_reason="stop",
            policy_version=v,
            engine_id="e0",
        )
        for v in versions
    ]
    return (
        prompt,
        request,
        GenerateResult(request_id=f"p{i}", completions=completions),
        [reward(s) for s in scores],
    )


def rollout(*groups: tuple) -> Rollout:
    p, q, r, s = (list(x) for x in zip(*groups, strict=True))
    return Rollout(p, q, r, s, {"seconds/generate": 1.0})


def test_teaching_groups_skip_errors_and_zero_variance():
    cfg = load_config()
    r = rollout(
        group(0, [1.0, 0.0], [0, 0]),  # teaches
        group(1, [1.0, 1.0], [0, 0]),  # zero variance
        group(2, [1.0, None], [0, 0]),  # an env error: the group is not trained on
    )
    assert teaching_groups(r, cfg) == 1
    keep_flat = load_config(overrides=["advantage.drop_zero_variance=false"])
    assert teaching_groups(r, keep_flat) == 2


def test_stale_groups_dropped_or_kept_for_tis_and_counted_either_way():
    r = rollout(group(0, [1, 0], [3, 3]), group(1, [1, 0], [3, 1]), group(2, [0, 1], [2, 2]))
    dropped, n = handle_stale(r, version=3, bound=1, how="drop")
    assert n == 1 and [p.id for p in dropped.prompts] == ["p0", "p2"]
    kept, n = handle_stale(r, version=3, bound=1, how="tis")
    assert n == 1 and [p.id for p in kept.prompts] == ["p0", "p1", "p2"]


def test_merge_keeps_every_group_once_and_adds_seconds():
    a, b = rollout(group(0, [1, 0], [0, 0])), rollout(group(1, [1, 0], [0, 0]))
    m = merge(a, b)
    assert [p.id for p in m.prompts] == ["p0", "p1"] and len(m.scores) == 2
    assert m.seconds["seconds/generate"] == 2.0


def test_stale_tis_without_a_cap_is_a_clear_error():
    with pytest.raises(ConfigError, match="tis_cap"):
        load_config(overrides=["rollout.stale='tis'"])
    cfg = load_config(overrides=["rollout.stale='tis'", "trainer.loss.tis_cap=2.0"])
    assert cfg.rollout.stale == "tis"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("ray", marks=pytest.mark.long), "local"])
def test_refill_tops_up_steps_with_fresh_prompts(tmp_path, mode):
    """With G = 2 about half the tiny model's groups have equal rewards; refill rounds draw
    new prompts until 8 groups teach, and every prompt a step used is logged, none twice."""
    caravela = str(Path(sys.executable).parent / "caravela")
    sets = [
        f"cluster.mode={mode}",
        "steps=4",
        "rollout.prompts_per_step=8",
        "rollout.group_size=2",
        "advantage.refill_rounds=3",
        "eval.num_prompts=8",
        "eval.k=2",
        "checkpoint.every_steps=0",
        f"output_dir='{tmp_path}'",
    ]
    out = subprocess.run(
        [caravela, "run", *(x for s in sets for x in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert sum(m["refill_prompts"] for m in metrics) > 0  # refills really happened
    for m, s in zip(metrics, steps, strict=True):
        assert len(s["prompts"]) == 8 + m["refill_prompts"]  # every drawn prompt is logged
        assert m["groups_kept"] <= 8
        if m["refill_rounds"] < 3:  # stopped early: the step is full
            assert m["groups_kept"] == 8
    used = [p for s in steps for p in s["prompts"]]
    assert len(used) == len(set(used))  # no prompt drawn twice
