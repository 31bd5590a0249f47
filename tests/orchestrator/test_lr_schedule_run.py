"""A short real run (one process, the shipped tiny model) with a cosine schedule: the run
hands the trainer its length (steps x updates_per_batch) and ``lr`` in metrics.jsonl is
the schedule's rate, step after step. That a resumed trainer continues the schedule is
tests/trainer/test_lr_schedule.py's."""

import json

import pytest

from orchestrator.config import load_config
from orchestrator.loop import run
from trainer.schedule import lr_factor


def test_metrics_show_the_cosine_schedule_over_the_runs_updates(tmp_path):
    cfg = load_config(
        overrides=[
            "cluster.mode=local",
            "steps=4",
            "rollout.prompts_per_step=8",
            "eval.num_prompts=4",
            "eval.k=2",
            "trainer.updates_per_batch=2",
            "trainer.warmup_steps=2",
            "trainer.lr_schedule=cosine",
            "trainer.min_lr_ratio=0.1",
            f"output_dir='{tmp_path}'",
        ]
    )
    run(cfg, log=lambda *_: None)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m["lr"] for m in lines if "lr" in m]
    assert len(lines) == 4 and trained  # a step with no group that teaches trains nothing
    rate = [cfg.trainer.lr * lr_factor(s, "cosine", 2, 8, 0.1) for s in range(8)]
    # the k-th trained step made updates 2k and 2k + 1 (8 in all): lr is their mean
    want = [(rate[2 * k] + rate[2 * k + 1]) / 2 for k in range(len(trained))]
    assert trained == pytest.approx(want)
    if len(trained) == 4:
        assert trained[-1] < 0.3 * cfg.trainer.lr  # near the floor at the end
