"""The learning-rate schedule (``trainer.lr_schedule``): the pure function's shapes, the
config's refusals, and a Trainer that resumes from a checkpoint mid-decay stepping with the
rates (and reaching the weights) of the uninterrupted run."""

import math

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from tests.trainer.test_data_parallel import cfg, make_batch, make_model
from trainer import checkpoint
from trainer.schedule import lr_factor
from trainer.trainer import Trainer


def factors(schedule, warmup, total, min_ratio=0.0, steps=None):
    return [lr_factor(s, schedule, warmup, total, min_ratio) for s in range(steps or total + 1)]


def test_warmup_then_constant_needs_no_total():
    assert factors("constant", 4, None, steps=7) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert factors("constant", 0, None, steps=3) == [1.0, 1.0, 1.0]


def test_linear_decays_from_the_end_of_warmup_to_min_ratio_at_the_end():
    got = factors("linear", 2, 12, steps=20)
    assert got[:3] == [0.5, 1.0, 1.0]  # warm-up, then the decay starts at 1
    assert got[7] == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert got[11] == pytest.approx(0.1)  # the run's last update: one step short of the end
    assert got[12:] == [0.0] * 8  # clamped past the end
    with_floor = factors("linear", 2, 12, min_ratio=0.2)
    assert with_floor[7] == pytest.approx(0.6) and with_floor[12] == pytest.approx(0.2)


def test_cosine_is_half_a_cosine_down_to_min_ratio():
    got = factors("cosine", 0, 10, min_ratio=0.1)
    assert got[0] == 1.0 and got[10] == pytest.approx(0.1)
    assert got[5] == pytest.approx(0.55)  # midpoint: halfway between 1 and the floor
    assert got[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a > b for a, b in zip(got, got[1:], strict=False))


def test_a_decay_without_the_runs_length_is_an_error():
    with pytest.raises(ValueError, match="cosine.*not told how many"):
        Trainer(make_model(), cfg("grpo").model_copy(update={"lr_schedule": "cosine"}))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.min_lr_ratio=0.1"], "set trainer.lr_schedule = 'cosine'"),
        (["trainer.lr_schedule=cosine", "trainer.min_lr_ratio=1.5"], "less than or equal to 1"),
        (["trainer.lr_schedule=step"], "'constant', 'linear' or 'cosine'"),
        (
            ["trainer.lr_schedule=linear", "trainer.warmup_steps=20", "steps=10"],
            "covers the whole run (10 steps x 1 updates = 10 optimizer steps)",
        ),
    ],
)
def test_bad_schedules_name_the_field_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert expected in str(e.value)


def test_a_resumed_trainer_continues_the_schedule_exactly(tmp_path):
    """5 batches of 2 updates (10 optimizer steps, cosine after 3 warm-up steps): saved after
    2 batches, a new Trainer loaded from the checkpoint steps with the rates and reaches the
    weights of the uninterrupted one; the rates are the schedule's, update by update."""
    total, lr = 10, 1e-2
    c = cfg("grpo", mu=2).model_copy(
        update={"lr_schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}
    )
    batches = [make_batch(n) for n in (11, 7, 9, 6, 8)]

    def trainer():
        return Trainer(make_model(), c, total_updates=total)

    run = trainer()
    rates = []
    for k, b in enumerate(batches):
        rates.append(run.train_step(b)["lr"])
        if k == 1:
            checkpoint.save(run, tmp_path)
    want = [lr * lr_factor(s, "cosine", 3, total, 0.1) for s in range(total)]
    assert rates == pytest.approx([(want[2 * k] + want[2 * k + 1]) / 2 for k in range(5)])
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)  # at the end

    resumed = trainer()
    assert checkpoint.load(resumed, tmp_path) == 2
    assert [resumed.train_step(b)["lr"] for b in batches[2:]] == rates[2:]
    after, expected = resumed.state_dict(master=True), run.state_dict(master=True)
    assert all(torch.equal(after[k], expected[k]) for k in expected)

    # resumed as a longer run (more steps): its own schedule from the saved position on
    longer = Trainer(make_model(), c, total_updates=20)
    checkpoint.load(longer, tmp_path)
    factor = [lr_factor(s, "cosine", 3, 20, 0.1) for s in (4, 5)]
    assert longer.train_step(batches[2])["lr"] == pytest.approx(lr * sum(factor) / 2)
