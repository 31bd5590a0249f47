"""The chaos bench's small version (``bench/chaos.py``), in the suite: a 40-step default run
on a real local Ray cluster while a thread of the driver kills, by PID and from outside the
run's code, an engine, an env pool host, an env worker and a trainer rank (SIGKILL), and
hangs an engine (SIGSTOP), at seeded random steps. The run must finish every step, say what
it recovered in its metrics, lose no prompt and train none twice."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from common.paths import REPO_ROOT as REPO

# `long`: each of these faults is recovered from in the default suite on its own
# (test_faults, test_trainer_restart, tests/inference_server/test_engine_recovery.py)
pytestmark = [pytest.mark.slow, pytest.mark.long]


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module
    spec.loader.exec_module(module)
    return module


def test_one_fault_of_each_kind_in_40_steps(local_ray, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.loop import run

    chaos = load_chaos()
    steps, n, g = 40, 8, 8
    faults = chaos.plan(seed=1, kinds=chaos.KINDS, first=4, last=30)
    out = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"output_dir='{out}'",
            f"steps={steps}",
            f"rollout.prompts_per_step={n}",
            f"rollout.group_size={g}",
            "eval.num_prompts=8",
            "eval.k=2",
            "checkpoint.every_steps=5",
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
            "inference.heartbeat_s=1",
            "inference.heartbeat_timeout_s=10",
            "inference.restart_backoff_s=0.5",
        ]
    )
    lines: list[str] = []
    with chaos.Chaos(out, faults, seed=1, log=lines.append) as injector:
        run(cfg, log=lines.append)
    fired = {f.kind: f.pid for f in injector.faults}
    assert all(fired.values()), f"faults that found no victim: {fired}\n" + "\n".join(lines)

    checks = chaos.check_accounting(out, steps, n * g)
    assert checks["steps_logged_once"], checks
    assert checks["prompts_distinct"], checks
    assert checks["completions_accounted"], checks
    assert checks["redone_steps_drew_the_same_prompts"], checks
    assert checks["steps_redone"] >= 1  # the trainer rank's death replayed some steps

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert last["restarts/trainer"] == 1
    assert last["restarts/engine"] == 2  # one killed, one hung
    assert last["engines/hangs"] == 1
    assert last["restarts/pool"] == 1
    assert last["restarts/worker"] >= 1
    assert last["engines/alive"] == 1
    assert last["envs_quarantined"] == 0
    # every fault is in the fault panel's counters, and the panel was drawn
    assert Path(out / "report.png").stat().st_size > 0
