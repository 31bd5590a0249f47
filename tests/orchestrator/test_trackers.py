"""``logging.trackers``: a run's step metrics in an offline W&B run and an MLflow file store
under the run directory (no network, no server), read back with W&B's own record schema and
MLflow's own client; a resumed run continues both; a tracker whose package is missing is
refused when the config loads, naming the extra to install."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.record import Recorder

ALL = 'logging.trackers=["tensorboard", "wandb", "mlflow"]'


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a ``.wandb`` file, parsed with W&B's protobuf schema. The file is
    W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
    of chunks (CRC-32 of type + data, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at {pos}"
        pos += 7 + length
        buf += chunk
        if kind in (1, 4):  # full or last: one record complete
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_history(run_dir: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The offline runs in ``run_dir/wandb`` (oldest first) and every step they logged."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [r for f in files for r in wandb_records(f)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return runs, history


def mlflow_client(run_dir: Path) -> Any:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file store opt-in
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_run_writes_offline_wandb_and_an_mlflow_file_store_that_read_back(tmp_path):
    out = tmp_path / "run"
    sets = [
        "cluster.mode=local",
        "steps=3",
        "rollout.prompts_per_step=4",
        "eval.num_prompts=4",
        "eval.k=1",
        "checkpoint.every_steps=0",
        ALL,
        "logging.wandb.project=caravela-test",
        "logging.mlflow.experiment=tiny-arith",
        f"output_dir='{out}'",
    ]
    caravela = str(Path(sys.executable).parent / "caravela")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    done = subprocess.run(
        [caravela, "run", *(x for s in sets for x in ("--set", s))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "wandb:" not in done.stdout  # W&B stays quiet on the run's terminal
    metrics = lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    ids = json.loads((out / "trackers.json").read_text())

    runs, history = wandb_history(out)
    assert [r.run_id for r in runs] == [ids["wandb"]] and runs[0].project == "caravela-test"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["steps"] == 3 and config["rollout"]["prompts_per_step"] == 4  # run config
    assert [h["_step"] for h in history] == [0, 1, 2]
    for h, m in zip(history, metrics, strict=True):
        assert {k: h[k] for k in m} == pytest.approx(m)  # every metric, W&B keeps "/" names

    client = mlflow_client(out)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-arith"
    assert run.data.params["steps"] == "3" and run.data.params["rollout.group_size"] == "8"
    per_env = "reward_mean/arith"  # beside reward_mean: "/" cannot be a file store's name
    for key in ("reward_mean", per_env, "groups_kept", "step_seconds"):
        logged = client.get_metric_history(ids["mlflow"], key.replace("/", "."))
        assert [(x.step, x.value) for x in logged] == [(m["step"], m[key]) for m in metrics]
    assert set(run.data.metrics) == {k.replace("/", ".") for k in metrics[-1]}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def step_metrics(step: int) -> dict[str, float]:
    return {"step": step, "reward_mean": step / 10, "groups_kept": 4.0, "step_seconds": 0.5}


def test_a_resumed_recorder_continues_the_same_wandb_and_mlflow_runs(tmp_path):
    cfg = load_config(overrides=[f"output_dir='{tmp_path}'", ALL])
    quiet = {"on_ray": False, "log": lambda *_: None, "config": cfg}
    with Recorder(tmp_path, 0, 4, **quiet) as record:
        for s in range(3):  # killed after step 2; the last checkpoint was at step 2
            record.step(s, [], step_metrics(s))
    first = json.loads((tmp_path / "trackers.json").read_text())
    with Recorder(tmp_path, 2, 4, **quiet) as record:
        for s in range(2, 4):
            record.step(s, [], step_metrics(s) | {"reward_mean": 1.0})
    assert json.loads((tmp_path / "trackers.json").read_text()) == first

    runs, history = wandb_history(tmp_path)
    assert [r.run_id for r in runs] == [first["wandb"]] * 2  # one W&B run, in two pieces
    assert [h["_step"] for h in history] == [0, 1, 2, 2, 3]  # `wandb sync` uploads in order

    client = mlflow_client(tmp_path)
    logged = client.get_metric_history(first["mlflow"], "reward_mean")
    assert sorted((x.step, x.value) for x in logged) == [
        (0, 0.0),
        (1, 0.1),
        (2, 0.2),
        (2, 1.0),  # the redone step: both values, by time
        (3, 1.0),
    ]
    assert client.get_run(first["mlflow"]).info.status == "FINISHED"


def test_a_failed_run_marks_its_mlflow_run_failed(tmp_path):
    cfg = load_config(overrides=[f"output_dir='{tmp_path}'", 'logging.trackers=["mlflow"]'])
    with pytest.raises(RuntimeError, match="step blew up"):
        with Recorder(tmp_path, 0, 4, on_ray=False, log=lambda *_: None, config=cfg) as record:
            record.step(0, [], step_metrics(0))
            raise RuntimeError("step blew up")
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert mlflow_client(tmp_path).get_run(run_id).info.status == "FAILED"
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("tracker,module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_whose_package_is_missing_is_refused_naming_the_extra(
    monkeypatch, tracker, module
):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f'logging.trackers=["tensorboard", "{tracker}"]'])
    text = str(err.value)
    assert f"logging.trackers: tracker '{tracker}' needs the {module} package" in text
    assert "pip install 'caravela[trackers]'" in text


def test_each_tracker_at_most_once_and_only_known_ones():
    with pytest.raises(ConfigError, match="each tracker at most once"):
        load_config(overrides=['logging.trackers=["mlflow", "mlflow"]'])
    with pytest.raises(ConfigError, match="logging.trackers.0"):
        load_config(overrides=['logging.trackers=["comet"]'])
