"""``TrainerGroup.on_trainer_node`` (the run's final export uses it): a call runs in rank 0's
process while it lives, and in a fresh task on a trainer node once it has died, so a rank
lost at the end of a run does not lose the export. Real Ray cluster, real rank actor."""

from __future__ import annotations

import os

import pytest

from common.paths import TINY_MODEL

pytestmark = pytest.mark.slow


def pid() -> int:
    return os.getpid()


def test_runs_in_rank_0_and_in_a_fresh_task_once_rank_0_is_dead(local_ray):
    import ray

    from trainer.config import TrainerConfig
    from trainer.group import TrainerGroup

    group = TrainerGroup(TINY_MODEL, TrainerConfig(cpus_per_rank=1))
    rank0 = group.pids()[0]
    assert group.on_trainer_node(pid) == rank0
    ray.kill(group.ranks[0], no_restart=True)
    elsewhere = group.on_trainer_node(pid)
    assert elsewhere not in (rank0, os.getpid())
