"""Experiment trackers a run's step metrics go to besides ``metrics.jsonl``
(``logging.trackers``): TensorBoard, Weights & Biases and MLflow, each writing files under
the run directory by default, so a run on an air-gapped compute node needs no network.

- ``tensorboard``: ``<run>/tensorboard/`` (``tensorboard --logdir``).
- ``wandb``: an offline W&B run in ``<run>/wandb/offline-run-*/`` (``logging.wandb.mode =
  "offline"``, what ``WANDB_MODE=offline`` does), uploaded later from a machine with
  internet by ``wandb sync <run>/wandb/offline-run-*``.
- ``mlflow``: an MLflow run in the file store ``file:<run>/mlruns`` (or any
  ``logging.mlflow.tracking_uri``), read by ``mlflow ui --backend-store-uri`` or MLflow's
  client. Metric names there have ``.`` for ``/`` (``mlflow_key``).

``LoggingConfig`` (the root config's ``logging`` section) says which and how. W&B and MLflow
are optional packages (``pip install 'caravela[trackers]'``); a config naming
one that is not installed is refused when it is loaded (``missing_package``). A resumed run
continues the same W&B and MLflow runs (their ids are kept in ``<run>/trackers.json``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from common.config import StrictModel

TrackerName = Literal["tensorboard", "wandb", "mlflow"]
PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker -> the module it needs."""
EXTRA = "trackers"
"""The ``pyproject.toml`` extra that installs W&B and MLflow."""
IDS_FILE = "trackers.json"
"""``<run>/trackers.json``: the W&B and MLflow run ids, for a resumed run to continue them."""


def missing_package(tracker: str) -> str | None:
    """What to install for ``tracker`` when its package is missing here, else None."""
    module = PACKAGES[tracker]
    if importlib.util.find_spec(module) is not None:
        return None
    return (
        f"tracker {tracker!r} needs the {module} package, which is not installed here: "
        f"pip install 'caravela[{EXTRA}]' (or drop {tracker!r} from logging.trackers)"
    )


class WandbConfig(StrictModel):
    """Weights & Biases (``logging.trackers`` has ``"wandb"``)."""

    mode: Literal["offline", "online"] = "offline"
    """offline: the run's files go to ``<output_dir>/wandb/offline-run-*`` and nothing is
    sent (compute nodes have no internet; upload later with ``wandb sync`` from the login
    node). online: streamed to the W&B server (needs a login and network on the head node)."""
    project: str = Field("caravela", min_length=1)
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the login's default (chosen at ``wandb sync``)."""
    name: str | None = None
    """Run name; None = the run directory's name."""
    tags: list[str] = Field(default_factory=list)
    """Run tags."""


class MlflowConfig(StrictModel):
    """MLflow (``logging.trackers`` has ``"mlflow"``)."""

    tracking_uri: str | None = None
    """Where the run is tracked; None = the file store ``file:<output_dir>/mlruns`` (no
    server, no network). A database or server URI works as MLflow takes it."""
    experiment: str = Field("caravela", min_length=1)
    """Experiment the run goes into (created when missing)."""
    run_name: str | None = None
    """Run name; None = the run directory's name."""


class LoggingConfig(StrictModel):
    """Where each step's metrics go besides ``metrics.jsonl`` (always written)."""

    trackers: list[TrackerName] = Field(default_factory=lambda: ["tensorboard"])  # type: ignore[arg-type]
    """Any of ``tensorboard`` (``<output_dir>/tensorboard``), ``wandb`` and ``mlflow`` (both
    need ``pip install 'caravela[trackers]'``; see ``orchestrator/trackers.py``)."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow settings."""
    samples: bool = True
    """Write the samples log, ``<output_dir>/samples/``: one JSON line per completion (prompt
    and request id, policy version, engine, env and env build, score or error, tokens,
    finish reason, trained or not, text); see ``orchestrator/samples.py``."""
    samples_text_chars: int = Field(1000, ge=0)
    """Each completion's text in the samples log, clipped to this many characters (its
    first and last half); 0 leaves the text out."""
    samples_rotate_mb: float = Field(64.0, gt=0)
    """The current ``samples/samples.jsonl`` is closed into a gzip segment
    (``samples-<first step>-<last step>.jsonl.gz``) before a step that would take it past
    this."""
    samples_max_mb: float = Field(4096.0, ge=0)
    """The most the samples log (its segments and current file) may hold: the oldest
    segments are deleted (and the deletion logged) to stay under it. 0: no bound."""

    @field_validator("trackers")
    @classmethod
    def _installed_once(cls, trackers: list[TrackerName]) -> list[TrackerName]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"each tracker at most once, got {trackers}")
        for name in trackers:
            why = missing_package(name)
            if why is not None:
                raise ValueError(why)
        return trackers

    @model_validator(mode="after")
    def _room_for_a_segment(self) -> LoggingConfig:
        if 0 < self.samples_max_mb < 2 * self.samples_rotate_mb:
            raise ValueError(
                f"logging.samples_max_mb = {self.samples_max_mb:g} leaves no room for a closed "
                f"segment and the current file of logging.samples_rotate_mb = "
                f"{self.samples_rotate_mb:g}: make it at least twice that, or lower "
                "samples_rotate_mb"
            )
        return self


class Tracker(Protocol):
    """One destination of the run's step metrics."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoard:
    """``<run>/tensorboard``; a resumed run purges the events of the steps it redoes."""

    def __init__(self, out_dir: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class Wandb:
    """A W&B run with its files in ``<run>/wandb`` (offline unless configured online)."""

    def __init__(
        self, cfg: WandbConfig, out_dir: Path, run_id: str | None, params: dict[str, Any]
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or out_dir.name,
            tags=cfg.tags,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(out_dir),
            mode=cfg.mode,
            config=params,
            # quiet terminal (the run's own progress bar), no stdout capture
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.id: str = self.run.id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Mlflow:
    """An MLflow run in ``tracking_uri`` (default: the file store ``file:<run>/mlruns``)."""

    def __init__(
        self, cfg: MlflowConfig, out_dir: Path, run_id: str | None, params: dict[str, Any]
    ) -> None:
        uri = cfg.tracking_uri or f"file:{(out_dir / 'mlruns').resolve()}"
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked;
            # it is what an air-gapped node has (a database on a shared filesystem is not).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.id = run_id
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.experiment)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=cfg.run_name or out_dir.name,
            tags={"caravela.run_dir": str(out_dir.resolve())},
        )
        self.id = run.info.run_id
        flat = [Param(k[:250], str(v)[:6000]) for k, v in _flatten(params).items()]
        self.client.log_batch(self.id, params=flat)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.id, metrics=batch)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")


def mlflow_key(metric: str) -> str:
    """The MLflow name of a metric: ``/`` becomes ``.`` (``reward_mean/arith`` ->
    ``reward_mean.arith``). MLflow's file store keeps each metric in a file named by its
    key, ``/`` making directories, so ``reward_mean`` and ``reward_mean/arith`` cannot both
    exist there; every store gets the same names."""
    return metric.replace("/", ".")


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists as JSON text."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return out


def open_trackers(
    cfg: LoggingConfig, out_dir: Path, start: int, params: dict[str, Any]
) -> list[Tracker]:
    """The trackers ``cfg`` names, opened for a run starting at
    step ``start`` (> 0: resumed, the W&B and MLflow runs of ``trackers.json`` continue);
    ``params`` is the run's config, recorded by W&B and MLflow."""
    out_dir = Path(out_dir)
    ids_file = out_dir / IDS_FILE
    ids: dict[str, str] = json.loads(ids_file.read_text()) if start and ids_file.exists() else {}
    opened: list[Tracker] = []
    try:
        for name in cfg.trackers:
            if name == "tensorboard":
                opened.append(TensorBoard(out_dir, start))
            elif name == "wandb":
                w = Wandb(cfg.wandb, out_dir, ids.get("wandb"), params)
                ids["wandb"] = w.id
                opened.append(w)
            elif name == "mlflow":
                m = Mlflow(cfg.mlflow, out_dir, ids.get("mlflow"), params)
                ids["mlflow"] = m.id
                opened.append(m)
    except BaseException:
        for t in opened:
            t.close(failed=True)
        raise
    if ids:
        ids_file.write_text(json.dumps(ids, indent=2) + "\n")
    return opened
