"""Run checkpoints for exact resume, and the two ways to ask for one.

A checkpoint is ``<run>/checkpoints/step-NNNNNN/`` holding

- ``trainer/``: model and optimizer, sharded: every trainer rank writes its own shard with
  ``torch.distributed.checkpoint`` (``.metadata`` and ``__<rank>_0.distcp``; nothing is
  gathered on one rank), and beside it ``trainer.json`` (version, LR scheduler) and
  ``rng/rank-<r>.pt`` (each rank's RNG state): ``trainer.checkpoint``, which also says how
  it resumes on another number of ranks or another ``trainer.sharding``;
- ``driver.json`` (``DriverState``: next step, version, the prompt sampler's state, the ids
  of prompts drawn but not yet trained on, the envs that joined, the "before" evaluation).

It is written into a ``.tmp`` directory, renamed into place once every rank has finished
writing, then ``LATEST`` is replaced atomically: a crash mid-write leaves the previous
checkpoint in charge, never a half one. Checkpoints of earlier versions (one ``trainer.pt``)
are refused on resume. On request: SIGUSR1 to the driver, or a file ``CHECKPOINT`` in the
run directory (removed once served).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

from orchestrator.protocol import DriverState


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "driver.json").exists() else None


def load(path: Path) -> DriverState:
    """The driver's state in checkpoint ``path``."""
    return DriverState.model_validate_json((Path(path) / "driver.json").read_text())


def save(run_dir: Path, driver: DriverState, trainers: Any, keep: int) -> Path:
    """Write the checkpoint of ``driver.step`` (the next step to run) and make it the latest;
    ``trainers`` (a trainer group) writes its part, every rank, and returns once all are done."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{driver.step:06d}"
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainers.save(tmp)
    (tmp / "driver.json").write_text(driver.model_dump_json())
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    (root / "LATEST.tmp").write_text(name)
    os.replace(root / "LATEST.tmp", root / "LATEST")
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Requests:
    """Notices a checkpoint request (SIGUSR1 or the ``CHECKPOINT`` file)."""

    def __init__(self, run_dir: Path) -> None:
        self.flag = Path(run_dir) / "CHECKPOINT"
        self.signalled = False
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (e.g. a test runner's worker thread)
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def take(self) -> bool:
        """True once per request."""
        asked = self.signalled or self.flag.exists()
        self.signalled = False
        self.flag.unlink(missing_ok=True)
        return asked
