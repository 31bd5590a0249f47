"""The learning-rate schedule (``trainer.lr_schedule``): a pure function of the update count.

``lr_factor(step, ...)`` is the factor on ``trainer.lr`` of the optimizer update that follows
``step`` updates (``LambdaLR``'s convention: the first update is ``step = 0``):

- warm-up, ``step < warmup``: ``(step + 1) / warmup``, a linear ramp whose last update runs
  at the full rate;
- then the decay chosen by ``schedule`` (``DECAYS``, keyed by the config's ``Literal``) over
  ``progress = (step - warmup) / (total - warmup)``, from 0 right after the warm-up to 1 at
  ``total`` (clamped there): ``factor = min_ratio + (1 - min_ratio) * decay(progress)``.
  ``constant`` is 1 throughout; ``linear`` and ``cosine`` fall from 1 to ``min_ratio``.

``total`` is the run's optimizer updates (``RunConfig.steps x updates_per_batch``), handed
to the trainer by whoever builds it (the trainer never reads the run's config). The last
update of a run is the one after ``total - 1``, one step short of ``min_ratio`` (the
convention of HF's ``get_cosine_schedule_with_warmup``): an update at a rate of 0 would
change nothing.

Nothing here keeps state: the scheduler's step count is saved with the trainer's checkpoint
(``trainer.checkpoint``), and the function rebuilt from the config gives the resumed run the
same rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.config import TrainerConfig

DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
"""Decay shape after the warm-up: progress in [0, 1] -> 1 down to 0."""


def lr_factor(step: int, schedule: str, warmup: int, total: int | None, min_ratio: float) -> float:
    """The factor on the base learning rate of the update after ``step`` updates (rules:
    module docstring). ``total`` may be None for ``constant`` only."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None and schedule != "constant":
        raise ValueError(
            f"trainer.lr_schedule = {schedule!r} decays over the run's optimizer updates, but "
            "the trainer was not told how many (total_updates)"
        )
    progress = 0.0 if total is None else min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - min_ratio) * (1.0 - DECAYS[schedule](progress))  # exactly 1 at no decay


def lr_lambda(cfg: TrainerConfig, total_updates: int | None) -> Callable[[int], float]:
    """``lr_factor`` for ``cfg`` over ``total_updates`` updates, for ``LambdaLR``; checked
    now (a decaying schedule without a total is an error here, not at the first step). A
    plain function, so ``LambdaLR.state_dict()`` keeps nothing of it but the step count."""
    lr_factor(cfg.warmup_steps, cfg.lr_schedule, cfg.warmup_steps, total_updates, cfg.min_lr_ratio)
    return lambda step: lr_factor(
        step, cfg.lr_schedule, cfg.warmup_steps, total_updates, cfg.min_lr_ratio
    )
