"""The rendered job script's own reactions, in seconds: signals, resume, per-node checks,
scratch, Ray's logs, timestamps, the Apptainer command as it runs.

The script runs under bash as on a batch node, with stand-ins for what it drives: ``srun``
(runs the step here, with the node's name, its scratch in ``TMPDIR`` as a site prolog
would set it, and ``CUDA_VISIBLE_DEVICES`` for the GPUs the step asked for), ``scontrol``
(node list, address, requeue recorded), ``apptainer`` (not installable here: records its
arguments and runs the command) and the job's venv (``ray`` opens the head's port and writes
a session log; ``caravela run`` saves a checkpoint when asked; the join check is a line).
Real SLURM, Ray and the run do all of this in ``test_local_slurm.py``, where one requeue
costs minutes; these cover the paths it does not take.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.launch import render

STUBS = {
    "bin/srun": r"""#!/bin/bash
node= gpus=0
while [ $# -gt 0 ]; do
    case "$1" in
        -w) node=$2; shift 2 ;;
        -c|--nodes|--ntasks) shift 2 ;;
        --gres=gpu:*) gpus=${1#--gres=gpu:}; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
echo "srun $node gpus=$gpus $1" >> "$STUB_LOG"
export SLURMD_NODENAME=$node TMPDIR=$STUB_ROOT/scratch/$node
mkdir -p "$TMPDIR"
unset CUDA_VISIBLE_DEVICES
[ "$gpus" -eq 0 ] || export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))
bound=STUB_GPUS_$node
[ -z "${!bound+x}" ] || export CUDA_VISIBLE_DEVICES=${!bound}
setsid "$@" &
child=$!
trap 'kill -- -$child 2>/dev/null' TERM
while true; do
    wait $child; rc=$?
    kill -0 $child 2>/dev/null || exit $rc
done
""",
    "bin/scontrol": r"""#!/bin/bash
case "$1 $2" in
    "show hostnames") printf '%s\n' $STUB_NODES ;;
    "show node") echo "NodeName=$3 NodeAddr=127.0.0.1 State=ALLOCATED" ;;
    "show job") echo "JobId=$3 JobState=$(cat "$STUB_ROOT/state" 2>/dev/null || echo RUNNING)" ;;
    requeue*) echo "requeue $2" >> "$STUB_LOG" ;;
esac
""",
    "bin/apptainer": r"""#!/bin/bash
echo "apptainer $* on ${SLURMD_NODENAME:-the batch node}" >> "$STUB_LOG"
shift
while [ $# -gt 0 ]; do case "$1" in --nv) shift ;; --bind) shift 2 ;; *) break ;; esac; done
shift
STUB_IN_IMAGE=1 exec "$@"
""",
    "bin/module": r"""#!/bin/bash
echo "module $* in_image=${STUB_IN_IMAGE:-0}" >> "$STUB_LOG"
""",
    "venv/bin/python": r"""#!/bin/bash
if [ "$1" = - ]; then
    cat > /dev/null
    sleep "${STUB_JOIN_SECONDS:-0}"
    echo "caravela: Ray cluster up (stand-in)"
    exit 0
fi
exec python3 "$@"
""",
    "venv/bin/ray": r"""#!/bin/bash
echo "ray $*"
for a; do
    case "$a" in --temp-dir=*) tmp=${a#*=} ;; --head) head=1 ;; --port=*) port=${a#*=} ;; esac
done
mkdir -p "$tmp/session_1/logs"
echo "raylet of $SLURMD_NODENAME" > "$tmp/session_1/logs/raylet.out"
ln -sfn "$tmp/session_1" "$tmp/session_latest"
[ -z "${head:-}" ] || exec python3 -c "
import socket, time
s = socket.socket(); s.bind(('127.0.0.1', $port)); s.listen(); time.sleep(120)"
exec sleep 120
""",
    "venv/bin/caravela": r"""#!/bin/bash
echo "caravela $*"
for _ in $(seq "${STUB_RUN_TENTHS:-5}"); do
    if [ -e "$RUN_DIR/CHECKPOINT" ]; then
        rm "$RUN_DIR/CHECKPOINT"
        mkdir -p "$RUN_DIR/checkpoints"
        echo step-000002 > "$RUN_DIR/checkpoints/LATEST"
        echo "checkpoint step-000002"
        sleep 0.5
        exit 0
    fi
    sleep 0.1
done
echo "all steps done"
""",
}
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Job:
    """The rendered script started under bash as a batch job would be; its output file."""

    def __init__(self, root: Path, script: Path, env: dict[str, str]) -> None:
        self.root, self.out = root, root / "slurm.out"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                ["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def output(self) -> str:
        return self.out.read_text()

    def wait_for(self, text: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} in the job's output:\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout_s: float = 30) -> tuple[int, str]:
        rc = self.proc.wait(timeout_s)
        return rc, self.output()

    def calls(self) -> str:
        log = self.root / "calls.log"
        return log.read_text() if log.exists() else ""


def _leftovers(root: Path) -> list[int]:
    """Processes still carrying ``STUB_ROOT=root`` (the stand-ins' sleeps)."""
    mark = f"STUB_ROOT={root}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.fixture
def start(tmp_path) -> Callable[..., Job]:
    """``start(profile_lines, *sets, env=...)``: render a job for a profile with the stub venv,
    run its script; every stand-in process is gone afterwards."""
    root = tmp_path
    for name, text in STUBS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    jobs: list[Job] = []

    def run(profile: list[str], *sets: str, env: dict[str, str] | None = None) -> Job:
        path = root / "profile.toml"
        lines = ['name = "stub"', f'venv = "{root / "venv"}"', 'node_tmp = "$TMPDIR"', *profile]
        path.write_text("\n".join(lines) + "\n")
        cfg = load_config(
            overrides=[
                f"output_dir='{root / 'run'}'",
                f"slurm.profile='{path}'",
                f"slurm.ray_port={_free_port()}",
                "slurm.checkpoint_wait=10",
                *sets,
            ]
        )
        script, _ = render(cfg)
        (root / "run").mkdir(exist_ok=True)
        (root / "job.sbatch").write_text(script)
        job_env = {
            **os.environ,
            "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
            "STUB_ROOT": str(root),
            "STUB_LOG": str(root / "calls.log"),
            "STUB_NODES": "node0 node1",
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "node[0-1]",
            "TMPDIR": str(root / "scratch" / "batch"),
            **(env or {}),
        }
        job_env.pop("SLURM_RESTART_COUNT", None)
        jobs.append(Job(root, root / "job.sbatch", job_env))
        return jobs[-1]

    yield run
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.kill()
    left = _leftovers(root)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


GPU2 = ["gpus_per_node = 2", "cpus_per_node = 1"]
"""Two GPUs per node (engines x GPUs per engine must be 2: two transformers engines)."""
GPU2_SETS = ("inference.backend={type='transformers', engines_per_node=2}",)


def test_a_run_leaves_every_line_timestamped_and_each_nodes_ray_logs(start):
    job = start(["cpus_per_node = 1", 'ray_interface = "lo"'])
    rc, text = job.finish()
    assert rc == 0, text
    lines = text.splitlines()
    assert all(STAMP.match(line) for line in lines), [x for x in lines if not STAMP.match(x)]
    assert "caravela: run finished" in text
    # each node checked what its step was given, and used its own scratch and address
    root = job.root
    for i in (0, 1):
        assert re.search(
            rf"caravela: node {i} \(node{i}\): \w+_node, \d+ CPUs \(affinity [0-9,-]+\), "
            rf"GPUs \[\], address 127\.0\.0\.1, Ray temp dir {root}/scratch/node{i}/ray-7-{i}\n",
            text,
        ), text
    assert "--node-ip-address=127.0.0.1" in text and "--num-gpus=0" in text
    logs = root / "run" / "ray-logs" / "job-7-restart-0"
    assert (logs / "node-0-node0" / "raylet.out").read_text() == "raylet of node0\n"
    assert (logs / "node-1-node1" / "raylet.out").read_text() == "raylet of node1\n"
    assert f"caravela: Ray logs in {logs}" in text
    assert "caravela: no checkpoint yet: the run starts at step 0" in text


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_usr1_and_term_checkpoint_then_requeue(start, sig):
    job = start(["cpus_per_node = 1"], env={"STUB_RUN_TENTHS": "300"})
    job.wait_for("caravela run ")
    job.proc.send_signal(getattr(signal, f"SIG{sig}"))
    rc, text = job.finish()
    assert rc == 0, text
    assert f"caravela: {sig}: asking for a checkpoint" in text
    assert "checkpoint step-000002" in text
    assert "caravela: checkpoint step-000002; requeueing" in text
    assert "requeue 7" in job.calls()
    assert "caravela: requeued" in text and "run finished" not in text
    assert (job.root / "run" / "ray-logs" / "job-7-restart-0" / "node-1-node1").is_dir()


def test_scancel_ends_the_job_without_a_requeue(start):
    """``scancel`` sends TERM to every step and the batch shell, with the job COMPLETING: the
    user's stop. The run is asked for a checkpoint while it lasts, and not requeued (SLURM
    accepts that requeue on the local SLURM, and the cancelled job comes back)."""
    job = start(["cpus_per_node = 1"], env={"STUB_RUN_TENTHS": "300"})
    job.wait_for("caravela run ")
    (job.root / "state").write_text("COMPLETING\n")  # what scontrol shows after scancel
    job.proc.send_signal(signal.SIGTERM)
    rc, text = job.finish()
    assert rc == 1, text
    assert (
        "caravela: SLURM is ending the job (JobState=COMPLETING: scancel, or the time limit), "
        "so it is not requeued; checkpoint step-000002: submitted again, the job resumes from it"
    ) in text
    assert "requeue 7" not in job.calls() and "caravela: requeued" not in text


def test_a_signal_while_the_cluster_forms_requeues_without_starting_the_run(start):
    job = start(["cpus_per_node = 1"], env={"STUB_JOIN_SECONDS": "2"})
    job.wait_for("ray start --address")  # both nodes started; the join check is running
    job.proc.send_signal(signal.SIGUSR1)
    rc, text = job.finish()
    assert rc == 0, text
    assert "caravela: USR1 before the run started" in text
    assert "requeue 7" in job.calls() and "caravela run" not in text


def test_resumes_whenever_a_checkpoint_exists(start, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text("step-000005\n")
    job = start(["cpus_per_node = 1"])  # restart count 0: a new job, same run directory
    rc, text = job.finish()
    assert rc == 0, text
    assert "caravela: resuming from checkpoint step-000005" in text
    assert re.search(r"caravela run \S+/config.json --address \S+ --token \S+ --resume\n", text)


def test_gpus_bound_per_node_step_and_checked(start):
    job = start(GPU2, *GPU2_SETS)
    rc, text = job.finish()
    assert rc == 0, text
    assert "srun node0 gpus=2 bash" in job.calls() and "srun node1 gpus=2 bash" in job.calls()
    assert "GPUs [0,1]" in text and "--num-gpus=2" in text


def test_a_step_bound_to_other_gpus_than_ray_would_advertise_stops_the_job(start):
    job = start(GPU2, *GPU2_SETS, env={"STUB_GPUS_node0": "0"})
    rc, text = job.finish()
    assert rc == 1, text
    assert (
        "caravela: node 0 (node0): SLURM bound 1 GPU(s) to this step (CUDA_VISIBLE_DEVICES=0), "
        "but Ray would advertise 2 (the profile's gpus_per_node)"
    ) in text
    assert "caravela: Ray's head did not start on node0" in text and "caravela run" not in text


def test_a_step_with_fewer_cpus_than_ray_would_advertise_stops_the_job(start):
    cpus = len(os.sched_getaffinity(0)) + 1
    job = start([f"cpus_per_node = {cpus}"])
    rc, text = job.finish()
    assert rc == 1, text
    assert re.search(
        rf"caravela: node 0 \(node0\): this step may run on {cpus - 1} CPU\(s\) \(affinity "
        rf"[0-9,-]+\), but Ray would advertise {cpus} \(the profile's cpus_per_node\): the step "
        rf"needs srun -c {cpus} --cpu-bind=none",
        text,
    ), text


def test_a_missing_interface_is_named(start):
    job = start(["cpus_per_node = 1", 'ray_interface = "ib7"'])
    rc, text = job.finish()
    assert rc == 1, text
    assert re.search(
        r"caravela: \S+: no IPv4 address on network interface 'ib7' \(the profile's "
        r"ray_interface\); this node has: .*lo",
        text,
    ), text
    assert "srun" not in job.calls()  # found on the head, before any step


def test_apptainer_binds_the_jobs_paths_and_loads_modules_inside(start, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((Path(load_config().datasets[0].path)).read_text())
    job = start(
        [
            "cpus_per_node = 1",
            f'apptainer_image = "{tmp_path / "img.sif"}"',
            'modules = ["cuda/12.4"]',
            'apptainer_modules = ["apptainer/1.3"]',
        ],
        f"datasets=[{{path='{data / 'train.jsonl'}', env='arith'}}]",
        f"envs=[{{name='arith', path='{load_config().envs[0].path}', "
        f"isolation={{type='venv', store='{store}'}}}}]",
    )
    rc, text = job.finish()
    assert rc == 0, text
    calls = job.calls()
    assert "module load apptainer/1.3 in_image=0" in calls  # on the host, for apptainer
    assert "module load cuda/12.4 in_image=1" in calls  # inside the image, for Ray and the run
    assert "module load cuda/12.4 in_image=0" not in calls
    ray_calls = [c for c in calls.splitlines() if c.startswith("apptainer") and "/ray start" in c]
    assert len(ray_calls) == 2, calls
    for line in ray_calls:
        node = line.rsplit(" on ", 1)[1]
        binds = re.findall(r"--bind (\S+)", line)
        paths = {p for b in binds for p in b.split(",")}
        # the run dir, venv, model, env store and data are under tmp_path or the repository
        for path in (tmp_path / "run", tmp_path / "venv", store, data):
            assert any(path.is_relative_to(p) for p in paths), (path, paths)
        assert str(tmp_path / "scratch" / node) in paths  # this node's scratch, resolved there
        assert f"{tmp_path / 'img.sif'} bash -c module load cuda/12.4 && exec" in line
