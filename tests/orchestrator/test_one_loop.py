"""One loop, two modes: the same ``caravela run`` on a local Ray cluster and in one process
(``cluster.mode``) checkpoints on request (the ``CHECKPOINT`` file, SIGUSR1), runs async with
TIS, writes TensorBoard and the report, and survives steps in which no group teaches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config

pytestmark = pytest.mark.slow


def caravela(out: Path, *sets: str) -> list[str]:
    base = ["rollout.prompts_per_step=8", "eval.num_prompts=8", "eval.k=2", f"output_dir='{out}'"]
    exe = str(Path(sys.executable).parent / "caravela")
    return [exe, "run", *(x for s in [*base, *sets] for x in ("--set", s))]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("mode", [pytest.param("ray", marks=pytest.mark.long), "local"])
def test_async_tis_run_checkpoints_on_request_and_records_everything(tmp_path, mode):
    out = tmp_path / "run"
    out.mkdir()
    (out / "CHECKPOINT").touch()  # asked before the first step: served after it
    sets = [
        f"cluster.mode={mode}",
        "steps=8",
        "checkpoint.every_steps=0",
        "checkpoint.keep=3",
        "rollout.max_staleness=1",
        "rollout.stale=tis",
        "trainer.loss.tis_cap=2.0",
    ]
    proc = subprocess.Popen(
        caravela(out, *sets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while len(lines(out / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert not (out / "CHECKPOINT").exists()  # served once
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved[0] == "step-000001" and len(saved) == 3, saved
    assert 4 <= int(saved[1].removeprefix("step-")) < 8  # the SIGUSR1 one, after step 3
    assert saved[2] == "step-000008"  # every run's last step
    driver = json.loads((out / "checkpoints" / saved[1] / "driver.json").read_text())
    assert len(driver["inflight"]) == 8  # async: the next step's prompts were in flight
    metrics = lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(8))
    assert all("staleness_max" in m and "groups_stale_corrected" in m for m in metrics)
    assert max(m["staleness_max"] for m in metrics) == 1  # generated while the step trained
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "report.png").stat().st_size > 0
    assert set(json.loads((out / "eval.json").read_text())) == {"before", "after", "sets"}


@pytest.mark.parametrize(
    "mode,backend",
    [
        pytest.param("ray", "transformers", marks=pytest.mark.long),
        ("local", "transformers"),
        pytest.param("local", "vllm", marks=pytest.mark.long),
    ],
)
def test_steps_where_no_group_teaches_train_and_push_nothing(tmp_path, mode, backend):
    """At temperature 1e-3 every completion of a prompt is the same, so every group has equal
    rewards and is dropped: such steps used to push an unchanged version, which the engine
    refused, ending the run."""
    sets = [
        f"cluster.mode={mode}",
        f"inference.backend.type={backend}",
        *(["inference.backend.compile=false"] if backend == "vllm" else []),
        "steps=3",
        "rollout.temperature=0.001",
        "rollout.group_size=4",
    ]
    out = tmp_path / "run"
    done = subprocess.run(caravela(out, *sets), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    metrics = lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    skipped = [m for m in metrics if m["groups_kept"] == 0]
    assert skipped, "no step without a teaching group: the test did not test anything"
    version = 0
    for i, m in enumerate(metrics):
        if m["groups_kept"] == 0:
            assert "loss" not in m and "weight_sync/seconds" not in m  # no train, no push
        else:
            version += 1
        assert m["version"] == version
        assert m["steps_without_batch"] == sum(x["groups_kept"] == 0 for x in metrics[: i + 1])


@pytest.mark.parametrize(
    "setting",
    [
        "trainer.ranks_per_node=2",
        "inference.backend.engines_per_node=2",
        "envs=[{name='arith', path='reward_envs/builtin/arith', replicas=2}]",
        "cluster.address='127.0.0.1:6379'",
    ],
)
def test_local_mode_refuses_what_needs_ray_naming_the_field(setting):
    field = setting.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["cluster.mode=local", setting])
    msg = str(e.value)
    assert "cluster.mode = 'ray'" in msg
    assert (field if field != "envs" else "envs[0].replicas") in msg


def test_a_prompt_longer_than_the_context_is_never_generated_and_is_counted(tmp_path):
    """vLLM refuses a prompt with no room for ``max_new_tokens`` in the model's context
    (the tiny model's is 128) and that used to end the run: now it is never drawn."""
    from common.paths import TINY_TRAIN

    with open(TINY_TRAIN) as f:
        rows = [json.loads(next(f)) for _ in range(7)]
    rows.insert(3, {**rows[0], "id": "too-long", "prompt": "Q: " + "1+" * 60 + "1 A: "})
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    sets = [
        "cluster.mode=local",
        "inference.backend.type=vllm",
        "inference.backend.compile=false",
        "steps=2",
        f"datasets=[{{path='{data}', env='arith'}}]",
    ]
    done = subprocess.run(caravela(out, *sets), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prompt 'too-long'" in done.stdout  # logged, with its id
    metrics = lines(out / "metrics.jsonl")
    assert [m["prompts_too_long/mixed"] for m in metrics] == [1.0, 1.0]  # counted once
    drawn = [p for s in lines(out / "prompts.jsonl") for p in s["prompts"]]
    assert len(drawn) == 16 and "too-long" not in drawn


def test_tis_with_top_p_below_one_is_refused_naming_both_fields():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["trainer.loss.tis_cap=2.0", "rollout.top_p=0.9"])
    assert "rollout.top_p = 1.0" in str(e.value) and "tis_cap" in str(e.value)


def test_the_last_step_is_checkpointed_and_the_model_exported_in_hf_format(tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer import checkpoint

    out = tmp_path / "run"
    sets = ["cluster.mode=local", "steps=3", "checkpoint.every_steps=2"]
    done = subprocess.run(caravela(out, *sets), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved == ["step-000002", "step-000003"]  # every 2 steps, and after the last one
    trained = checkpoint.weights(out / "checkpoints" / "step-000003")
    exported = load_file(out / "final" / "model.safetensors")
    assert exported and all(torch.equal(t, trained[n]) for n, t in exported.items())
    # the export is a model directory a new run (or caravela serve / eval) starts from
    again = tmp_path / "again"
    more = ["cluster.mode=local", "steps=1", f"model='{out / 'final'}'"]
    done = subprocess.run(caravela(again, *more), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before = json.loads((again / "eval.json").read_text())["before"]
    assert before == json.loads((out / "eval.json").read_text())["after"]
