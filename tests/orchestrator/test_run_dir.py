"""A run never destroys a previous one: it refuses a run directory holding one unless told
``--resume`` (continue it) or ``--overwrite`` (delete it, the only thing that deletes or
truncates a previous run's files), and a resumed run moves the lines of the steps it redoes
aside instead of dropping them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.record import Recorder
from orchestrator.rundir import RESULTS, RunDirError, claim

CARAVELA = str(Path(sys.executable).parent / "caravela")


def tiny_run(out: Path, flag: str, *sets: str) -> subprocess.CompletedProcess[str]:
    """``caravela run FLAG`` of the tiny default in one process, into ``out``."""
    base = ["cluster.mode=local", "rollout.prompts_per_step=4", "eval.num_prompts=4", "eval.k=1"]
    args = [x for s in [*base, *sets, f"output_dir='{out}'"] for x in ("--set", s)]
    return subprocess.run(
        [CARAVELA, "run", flag, *args], capture_output=True, text=True, timeout=600
    )


def previous_run(out: Path) -> dict[str, bytes]:
    """A run directory as a stopped run leaves it (what the files hold does not matter
    here), with what the SLURM launcher and ``caravela data prepare`` put there before."""
    files = {
        "config.json": b'{"steps": 9}',
        "job.sbatch": b"#!/bin/bash\n",
        "prepared/arith.npz": b"tokens",
        "env-api/api-token": b"secret",
        "metrics.jsonl": b'{"step": 0}\n{"step": 1}\n',
        "prompts.jsonl": b'{"step": 0, "prompts": ["a"]}\n{"step": 1, "prompts": ["b"]}\n',
        "checkpoints/LATEST": b"step-000002",
        "checkpoints/step-000001/driver.json": b"{}",
        "checkpoints/step-000002/driver.json": b"{}",
        "final/config.json": b"{}",
        "eval.json": b"{}",
        "envs/arith-worker0.log": b"log",
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return files


def contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_caravela_run_refuses_a_previous_run_naming_both_options_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    files = previous_run(out)
    done = subprocess.run(
        [CARAVELA, "run", "--set", "cluster.mode=local", "--set", f"output_dir='{out}'"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "holds a previous run" in done.stderr
    assert "--resume" in done.stderr and "--overwrite" in done.stderr
    assert contents(out) == files  # no file truncated, no checkpoint rotated away


@pytest.mark.parametrize("name", RESULTS)
def test_each_result_of_a_run_marks_a_previous_run(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(RunDirError, match="--overwrite"):
        claim(tmp_path, resume=False, overwrite=False)


def test_what_the_launcher_and_data_prepare_leave_is_no_previous_run(tmp_path):
    for name in ("config.json", "job.sbatch", "prepared/x.npz", "env-api/api-token", "CHECKPOINT"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    before = contents(tmp_path)
    claim(tmp_path, resume=False, overwrite=False)
    claim(tmp_path, resume=False, overwrite=True)
    assert contents(tmp_path) == before


def test_overwrite_deletes_the_previous_run_and_keeps_the_inputs_of_the_next(tmp_path):
    files = previous_run(tmp_path)
    said: list[str] = []
    claim(tmp_path, resume=False, overwrite=True, log=said.append)
    kept = {k: v for k, v in files.items() if k.split("/")[0] not in (*RESULTS, "envs")}
    assert contents(tmp_path) == kept
    assert set(kept) == {"config.json", "job.sbatch", "prepared/arith.npz", "env-api/api-token"}
    assert said and "deleted the previous run" in said[0]


def test_overwrite_refuses_to_delete_what_the_next_run_reads(tmp_path):
    files = previous_run(tmp_path)
    with pytest.raises(RunDirError, match="copy it out of the run directory"):
        claim(tmp_path, resume=False, overwrite=True, reads=[tmp_path / "final"])
    assert contents(tmp_path) == files


def test_resume_before_any_checkpoint_starts_at_step_0_keeping_the_earlier_lines(tmp_path):
    """A job stopped before its first checkpoint leaves lines and no checkpoint; the SLURM job
    always passes --resume, so its next try must start at step 0, not be refused, and keep
    what the earlier try wrote (aside)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "earlier": 1}\n')
    (out / "prompts.jsonl").write_text('{"step": 0, "prompts": ["x"]}\n')
    done = tiny_run(out, "--resume", "steps=2", "checkpoint.every_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no checkpoint in" in done.stdout and "the run starts at step 0" in done.stdout
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [0, 1] and "earlier" not in steps[0]
    aside = (out / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in aside] == [{"step": 0, "earlier": 1}]
    assert (out / "prompts.superseded.jsonl").read_text() == '{"step": 0, "prompts": ["x"]}\n'
    with pytest.raises(RunDirError, match="--resume continues.*--overwrite deletes"):
        claim(out, resume=True, overwrite=True)


def test_a_resumed_recorder_moves_the_lines_of_redone_steps_aside(tmp_path):
    """A run killed after step 3 whose last checkpoint is at step 2 redoes steps 2 and 3:
    their old lines go to ``*.superseded.jsonl``, so each step is once in ``metrics.jsonl``
    and no line a run wrote is lost."""
    for name in ("metrics.jsonl", "prompts.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
    with Recorder(tmp_path, 2, 6, on_ray=False, log=lambda *_: None) as record:
        assert record.history == [{"step": 0}, {"step": 1}]
    for name in ("metrics", "prompts"):
        kept = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        aside = (tmp_path / f"{name}.superseded.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in kept] == [0, 1]
        assert [json.loads(x)["step"] for x in aside] == [2, 3]


@pytest.mark.slow
def test_overwrite_starts_a_new_run_with_none_of_the_old_ones_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    previous_run(out)
    done = tiny_run(out, "--overwrite", "steps=1", "checkpoint.keep=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--overwrite: deleted the previous run" in done.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step-000001"]
    assert (out / "prepared" / "arith.npz").read_bytes() == b"tokens"  # inputs stay
    assert (out / "final" / "model.safetensors").exists()
