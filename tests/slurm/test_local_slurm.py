"""The rendered job on a real SLURM: Debian's slurm-wlm started by ``slurm.local_cluster``
(munged, slurmctld and two slurmd "nodes" on this machine, inside the test's loopback-only
network namespace), with steps bound as on a cluster (``task/affinity``) and one GPU per
node as typed GRES (a fake device: SLURM sets ``CUDA_VISIBLE_DEVICES`` for it, torch here
has no CUDA). One sbatch job: each node's step gets the node's CPUs and its GPU, Ray starts
on the address of the profile's interface (``lo``) with each node's own scratch, the Ray
cluster forms with an inference and a trainer node advertising them, steps run, USR1 to the
batch shell makes a checkpoint and a requeue, the rerun (``SLURM_RESTART_COUNT`` 1) resumes
at the saved step with no step lost or repeated, the run finishes, Ray's logs of both runs
are in the run directory, and the job's one output file shows all of it, every line of the
script's with its time. Nothing is mocked but the GPU.

Needs root and the slurm-wlm + munge packages (``.ci/run`` installs them); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.paths import ARITH_ENV
from orchestrator.cluster import loopback_only
from orchestrator.config import load_config
from orchestrator.launch import write
from slurm import local_cluster

pytestmark = pytest.mark.slow

STEPS = 16
"""Enough that USR1, sent once two steps are done, lands mid-run: unloaded, a step takes
0.3 s here, and with 8 the run once finished before the signal was handled."""
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ip")


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (munged, slurmd)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"needs Debian's slurm-wlm and munge (missing: {', '.join(missing)}); "
            "`apt-get install slurm-wlm munge` (.ci/run does)"
        )
    if not loopback_only():
        return "Ray must run in a loopback-only network namespace (`make test` sets one up)"
    return None


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line mentions ``text`` (the cluster's directory: SLURM's
    daemons name their conf, Ray's processes their temp dir under it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state not in ("Z", "X"):
            found.append(f"{proc.name} {cmd[:200]}")
    return found


@pytest.fixture
def local_slurm() -> Iterator[tuple[dict[str, str], Path]]:
    """A 2-node local SLURM; stopped afterwards with nothing of it or its jobs left running."""
    reason = _why_skip()
    if reason:
        pytest.skip(reason)
    # short, and searchable by all: munged's and Ray's unix sockets live under it
    root = Path(tempfile.mkdtemp(prefix="cvl-", dir="/tmp"))
    root.chmod(0o755)
    try:
        env = local_cluster.start(root / "slurm", nodes=2, cpus=2, gpus=1)
        yield {**os.environ, **env}, root
    finally:
        local_cluster.stop(root / "slurm")
        leaked = _processes_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)
        assert not leaked, f"processes left after stopping the local SLURM: {leaked}"


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


class Job:
    """A submitted job: its output file and SLURM's view of it."""

    def __init__(self, job_id: str, log: Path, env: dict[str, str]) -> None:
        self.id, self.log, self.env = job_id, log, env

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def show(self) -> str:
        cmd = ["scontrol", "show", "job", self.id]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True).stdout

    def wait_for(self, what: str, done: Callable[[], bool], timeout_s: float) -> None:
        """Until ``done()``; fails at once, with the job's output, if the job ends first."""
        deadline = time.monotonic() + timeout_s
        while not done():
            state = re.search(r"JobState=(\S+)", self.show())
            ended = state is not None and state.group(1) in ENDED
            if (ended and not done()) or time.monotonic() > deadline:
                why = f"the job ended ({state and state.group(1)})" if ended else "timed out"
                text = self.output() or "(no job output)"
                pytest.fail(f"{why} waiting for {what}; job output:\n{text[-4000:]}")
            time.sleep(0.2)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_job_forms_cluster_checkpoints_on_usr1_requeues_and_resumes(local_slurm, tmp_path):
    env, root = local_slurm
    profile = root / "profile.toml"  # Ray's temp dirs under root; "$SLURM_JOB_ID" expands on
    profile.write_text(  # each node
        'name = "local"\ncpus_per_node = 2\ngpus_per_node = 1\nray_interface = "lo"\n'
        f'node_tmp = "{root}/scratch-$SLURM_JOB_ID"\n'
    )
    run_dir = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"output_dir='{run_dir}'",
            f"steps={STEPS}",
            "rollout.prompts_per_step=8",
            "eval.num_prompts=8",
            "eval.k=2",
            "checkpoint.every_steps=0",  # only the one USR1 asks for
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
            f"envs=[{{name='arith', path='{ARITH_ENV}', workers=1, isolation={{type='venv'}}}}]",
            f"slurm.profile='{profile}'",
            "slurm.nodes=2",
            "slurm.inference_nodes=1",
            "slurm.ray_port=16379",  # inside Ray's default worker port range: must still work
        ]
    )
    script = write(cfg)
    out = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    job = Job(job_id, run_dir / f"slurm-{job_id}.out", env)
    metrics, prompts = run_dir / "metrics.jsonl", run_dir / "prompts.jsonl"

    def steps_done() -> int:  # complete lines only: the driver may be writing one
        return metrics.read_text().count("\n") if metrics.exists() else 0

    job.wait_for("two training steps", lambda: steps_done() >= 2, 420)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=env, check=True)
    job.wait_for("the checkpoint and the requeue", lambda: "requeueing" in job.output(), 240)
    job.wait_for("the rerun to finish", lambda: "caravela: run finished" in job.output(), 420)
    ended = re.compile(r"JobState=(COMPLETED|COMPLETING|FAILED) ")  # after Ray's logs are copied
    job.wait_for("the job to end", lambda: ended.search(job.show()) is not None, 60)

    text = job.output()
    # one output file for both runs (--open-mode=append), and the restart count went up
    assert f"caravela: job {job.id} restart 0 nodes node0 node1" in text
    assert f"caravela: job {job.id} restart 1 nodes node0 node1" in text
    # both times every node's step got the node's CPUs and its GPU, Ray the interface's
    # address and the node's scratch, and every node joined, with both roles
    for i, role in enumerate(("inference_node", "trainer_node")):
        node = (
            rf"caravela: node {i} \(node{i}\): {role}, (\d+) CPUs \(affinity [0-9,-]+\), "
            rf"GPUs \[0\], address 127\.0\.0\.1, Ray temp dir {root}/scratch-{job.id}/"
            rf"ray-{job.id}-{i}\n"
        )
        found = re.findall(node, text)
        assert len(found) == 2 and all(int(c) >= 2 for c in found), text[-4000:]
    up = "caravela: Ray cluster up: 2 nodes (inference_node 1, trainer_node 1), CPU 2, GPU 1 each"
    assert text.count(up) == 2, text[-4000:]
    # the script's lines, Ray's and the run's carry their time; SLURM's own (slurmstepd) not
    untimed = [x for x in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", x)]
    assert all(x.startswith("slurmstepd") for x in untimed), untimed
    first, second = text.split(" restart 1 ", 1)
    saved = re.search(r"caravela: checkpoint step-(\d+); requeueing", first)
    assert "caravela: USR1: asking for a checkpoint" in first and saved, first[-3000:]
    step = int(saved.group(1))
    assert 2 <= step < STEPS  # USR1 came after two steps, well before the last one
    assert f"checkpoints/step-{step:06d} at step {step} " in second  # "resumed from ... at step"
    assert f"caravela: resuming from checkpoint step-{step:06d}" in second
    assert "resumed from" in second and "caravela: run finished" in second
    assert "caravela: run finished" not in first
    # every step exactly once across the requeue: no gap, no repeat
    assert [r["step"] for r in lines(prompts)] == list(range(STEPS))
    assert [int(r["step"]) for r in lines(metrics)] == list(range(STEPS))
    assert json.loads((run_dir / "eval.json").read_text())["after"]["n"] == 8
    for restart in (0, 1):  # Ray's session logs of each node, from both runs of the job
        logs = run_dir / "ray-logs" / f"job-{job.id}-restart-{restart}"
        for i in (0, 1):
            assert (logs / f"node-{i}-node{i}" / "raylet.out").stat().st_size > 0, restart
    state = job.show()
    assert re.search(r"JobState=COMPLET(ED|ING) ", state) and "Restarts=1 " in state, state
