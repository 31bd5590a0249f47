"""A trainer rank SIGKILLed mid-run, on a real local Ray cluster: the run forms the trainer
group again from its last checkpoint in the same process, replays the prompts after it
exactly (the steps redone draw the prompts they drew before), pushes the weights on to the
engines under a version after theirs, and finishes with every step logged once."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest

from orchestrator.config import load_config

pytestmark = pytest.mark.slow


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_dead_rank_is_replaced_and_the_prompts_after_the_checkpoint_replayed(
    local_ray, tmp_path, monkeypatch
):
    from orchestrator.loop import run
    from trainer.group import TrainerGroup

    killed: list[tuple[int, list[int]]] = []
    train_step = TrainerGroup.train_step

    def kill_in_step_5(group, batch):
        if batch.step == 5 and not killed:
            pids = group.pids()
            killed.append((batch.step, pids))
            os.kill(pids[0], signal.SIGKILL)
        return train_step(group, batch)

    monkeypatch.setattr(TrainerGroup, "train_step", kill_in_step_5)
    out = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"output_dir='{out}'",
            "steps=8",
            "rollout.prompts_per_step=8",
            "rollout.group_size=8",
            "eval.num_prompts=8",
            "eval.k=2",
            "checkpoint.every_steps=3",
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
        ]
    )
    lines: list[str] = []
    run(cfg, log=lines.append)

    assert killed, "the rank was never killed"
    # every step once in each file; the steps redone (3, 4; 5 died) were set aside
    prompts, metrics = jsonl(out / "prompts.jsonl"), jsonl(out / "metrics.jsonl")
    assert [p["step"] for p in prompts] == list(range(8))
    assert [m["step"] for m in metrics] == list(range(8))
    first_try = jsonl(out / "prompts.superseded.jsonl")
    assert [p["step"] for p in first_try] == [3, 4]
    # replayed exactly: the steps after the checkpoint drew the very prompts they drew before
    assert first_try == prompts[3:5]
    # the group was formed again, from the checkpoint of step 3, by new processes
    assert [m["restarts/trainer"] for m in metrics] == [0.0] * 3 + [1.0] * 5
    assert any("a trainer rank died" in x and "forming the trainer group again" in x for x in lines)
    assert any("from " in x and "at step 3" in x for x in lines if "formed again" in x)
    # the engines had version 5 (pushed after step 4); the trainer numbers on after it
    versions = [m["version"] for m in metrics]
    assert versions[:3] == [1.0, 2.0, 3.0]
    assert versions[3:] == [7.0, 8.0, 9.0, 10.0, 11.0], versions
    assert all(m["weight_sync/probe_mean_diff"] < 1e-3 for m in metrics)
    # the samples log (orchestrator.samples): every completion of every step once, as many
    # as were scored or errored, in prompts.jsonl's groups; the redone steps' set aside
    from orchestrator import samples

    logged = list(samples.read(out))
    for p, m in zip(prompts, metrics, strict=True):
        mine = [x for x in logged if x["step"] == p["step"]]
        assert mine and len(mine) == m["items_scored"] + m["reward_errors"]
        assert [x["prompt"] for x in mine[::8]] == p["prompts"]
        assert len({x["request"] for x in mine if x["trained"]}) == m["groups_kept"]
        assert all(x["policy_version"] <= m["version"] for x in mine)
    assert len(logged) == sum(m["items_scored"] + m["reward_errors"] for m in metrics)
    with gzip.open(out / "samples" / "samples.superseded.jsonl.gz", "rt") as f:
        redone = [json.loads(x)["step"] for x in f]
    assert sorted(set(redone)) == [3, 4] and redone == sorted(redone)
