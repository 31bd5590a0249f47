"""Kill -9 of the driver mid-run, then ``caravela run --resume``: the resumed run trains on
exactly the prompts, step by step, that an uninterrupted run trains on. The same test on
Ray and in one process (``cluster.mode``): one loop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def command(out: Path, mode: str, *extra: str) -> list[str]:
    caravela = str(Path(sys.executable).parent / "caravela")
    sets = [
        f"cluster.mode={mode}",
        "steps=6",
        "checkpoint.every_steps=2",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        f"output_dir='{out}'",
    ]
    return [caravela, "run", *extra, *(x for s in sets for x in ("--set", s))]


def steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", [pytest.param("ray", marks=pytest.mark.long), "local"])
def test_kill_and_resume_skips_and_repeats_no_prompt(tmp_path, mode):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(command(ref, mode), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        command(cut, mode),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while (
        not (cut / "metrics.jsonl").exists()
        or len((cut / "metrics.jsonl").read_text().splitlines()) < 3
    ):  # steps 0-2 done; the checkpoint after step 1 is on disk
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    proc.wait()
    assert (cut / "checkpoints" / "LATEST").read_text() == "step-000002"

    resumed = subprocess.run(
        command(cut, mode, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert [s["step"] for s in steps(cut)] == list(range(6))  # each step exactly once
    assert steps(cut) == steps(ref)  # and the same prompts in each
    # the killed run's lines of the steps the resumed one redid are kept aside, not dropped
    aside = [json.loads(x) for x in (cut / "prompts.superseded.jsonl").read_text().splitlines()]
    assert aside and aside == steps(ref)[2 : 2 + len(aside)]
    assert len((cut / "metrics.superseded.jsonl").read_text().splitlines()) == len(aside)
    assert (
        json.loads((cut / "eval.json").read_text())["before"]
        == json.loads((ref / "eval.json").read_text())["before"]
    )
