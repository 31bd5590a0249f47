"""Where a run's steps are written down: ``metrics.jsonl``, ``prompts.jsonl``, the trackers
of ``logging.trackers`` (TensorBoard, W&B, MLflow: ``orchestrator.trackers``), the Ray
dashboard's gauges (on Ray), and the terminal (a progress bar, or a line every 10
steps when the output is not a terminal).

A resumed run keeps the lines of the steps before its checkpoint and moves those of the
steps it redoes to ``metrics.superseded.jsonl`` / ``prompts.superseded.jsonl`` (appended),
so every step appears exactly once in each file and no line is lost. The samples log
(``samples/``, one line per completion: ``orchestrator.samples``) is kept the same way.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from orchestrator.config import RunConfig
from orchestrator.data import Prompt
from orchestrator.samples import DIR, SamplesLog, supersede
from orchestrator.trackers import LoggingConfig, open_trackers

if TYPE_CHECKING:
    from orchestrator.rollout import Rollout

FILES = ("metrics.jsonl", "prompts.jsonl")


def superseded(path: Path) -> Path:
    """Where the lines of ``path`` (``metrics.jsonl``) that a resumed run redoes go."""
    return path.with_name(path.name.replace(".jsonl", ".superseded.jsonl"))


def progress_bar() -> Any:
    """A rich progress bar (step, reward, tokens/s, ETA) on a terminal; disabled otherwise."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not sys.stdout.isatty(),
    )


class Recorder:
    """Writes each step's metrics and prompt ids everywhere they go; keeps the history."""

    def __init__(
        self,
        out_dir: Path,
        start: int,
        steps: int,
        on_ray: bool,
        log: Callable[[str], Any] = print,
        config: RunConfig | None = None,
    ) -> None:
        self.out_dir, self.steps, self.log = Path(out_dir), steps, log
        self.history: list[dict[str, float]] = []
        self._keep(start)
        # TensorBoard, W&B, MLflow: as ``logging.trackers`` says (default: TensorBoard)
        logging = config.logging if config is not None else LoggingConfig()
        params = config.model_dump(mode="json") if config is not None else {}
        self.trackers = open_trackers(logging, self.out_dir, start, params)
        self.samples: SamplesLog | None = None
        if logging.samples:
            drop = config.advantage.drop_zero_variance if config is not None else True
            self.samples = SamplesLog.open(self.out_dir, logging, start, drop, log)
        elif (self.out_dir / DIR).is_dir():  # turned off on resume: still one copy per step
            supersede(self.out_dir / DIR, start)
        self.gauges: Any = None
        if on_ray:  # the same metrics on the Ray dashboard / Prometheus
            from orchestrator.monitor import RunMetrics

            self.gauges = RunMetrics(self.out_dir.name)
        self._open()
        self.bar = progress_bar()
        self.task = self.bar.add_task("train", total=steps, completed=start, info="")

    def _keep(self, start: int) -> None:
        """The steps before ``start`` stay; the lines of later ones move aside."""
        for name in FILES:
            path = self.out_dir / name
            lines = path.read_text().splitlines() if path.exists() else []
            kept, redone = lines[:start], lines[start:]
            if redone:
                with open(superseded(path), "a") as f:
                    f.writelines(x + "\n" for x in redone)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(x + "\n" for x in kept))
                os.replace(tmp, path)
            if name == "metrics.jsonl":
                self.history = [json.loads(x) for x in kept]

    def _open(self) -> None:
        self.metrics_file = open(self.out_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.prompts_file = open(self.out_dir / "prompts.jsonl", "a")  # noqa: SIM115

    def rewind(self, step: int) -> None:
        """The run goes on from ``step`` again (the trainer ranks were formed again from a
        checkpoint): the lines of the steps it redoes move aside, as on a resume."""
        self.metrics_file.close()
        self.prompts_file.close()
        self._keep(step)
        self._open()
        if self.samples is not None:
            self.samples.rewind(step)
        self.bar.update(self.task, completed=step)

    def __enter__(self) -> Recorder:
        self.bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bar.__exit__(kind, exc, tb)
        self.metrics_file.close()
        self.prompts_file.close()
        if self.samples is not None:
            self.samples.close()
        for tracker in self.trackers:
            tracker.close(failed=kind is not None)

    def step(
        self,
        step: int,
        prompts: list[Prompt],
        metrics: dict[str, float],
        rollout: Rollout | None = None,
    ) -> None:
        """One finished step: ``metrics``, the ids of every prompt it used and, given the
        ``rollout`` it trained on, every completion in the samples log."""
        if rollout is not None and self.samples is not None:
            self.samples.write(step, rollout)
        self.history.append(metrics)
        for tracker in self.trackers:
            tracker.log(step, metrics)
        if self.gauges is not None:
            self.gauges.record(metrics)
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        self.prompts_file.write(json.dumps({"step": step, "prompts": [p.id for p in prompts]}))
        self.prompts_file.write("\n")
        self.prompts_file.flush()
        info = (
            f"reward {metrics['reward_mean']:.3f}  groups kept {int(metrics['groups_kept'])}"
            f"/{len(prompts)}  {metrics['step_seconds']:.2f} s/step"
        )
        self.bar.update(self.task, advance=1, info=info)
        if self.bar.disable and (step % 10 == 0 or step == self.steps - 1):
            self.log(f"step {step:4d}  {info}")
