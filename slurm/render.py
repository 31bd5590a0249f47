"""``caravela slurm render|submit``: the sbatch script for a run, checked before submission.

The launcher only renders and starts: it writes the resolved run config into the run
directory and the script next to it, and (``submit``) hands the script to ``sbatch``.
Everything that can be wrong with the request is an error here, on the login node,
not minutes later on the compute nodes. It never reads a run config itself: the
orchestrator resolves one and hands over a ``JobRequest`` and the config's JSON text
(``orchestrator/launch.py``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from slurm.config import SiteProfile, SlurmConfig

TEMPLATE = Path(__file__).resolve().parent / "caravela.sbatch"


class LaunchError(ValueError):
    """The job cannot work as configured; the message says what to change."""


@dataclass(frozen=True)
class JobRequest:
    """What the launcher checks and renders of a run (filled in from its config)."""

    slurm: SlurmConfig
    """The run config's ``slurm`` section."""
    run_dir: Path
    """The run's output directory, absolute: the script, config and job output go there."""
    model: Path
    """The model directory the run loads (it must be on the shared filesystem)."""
    env_stores: Mapping[str, Path] = field(default_factory=dict)
    """Env name -> the store its venv must already be built in, for every venv-isolated env."""
    engines_per_node: int = 1
    """Inference engines on each inference node."""
    gpus_per_engine: int = 1
    """GPUs each engine reserves on a GPU node (vLLM's ``tensor_parallel_size``; 1 for the
    transformers backend)."""
    ranks_per_node: int = 1
    """Trainer ranks on each trainer node (each reserves one GPU on a GPU node)."""


def check(job: JobRequest, profile: SiteProfile) -> None:
    s = job.slurm
    trainers = s.nodes - s.inference_nodes
    if trainers < 1:
        raise LaunchError(
            f"slurm.nodes = {s.nodes} with slurm.inference_nodes = {s.inference_nodes} leaves "
            "zero trainer nodes; raise slurm.nodes or lower slurm.inference_nodes"
        )
    if not (Path(job.model) / "config.json").exists():
        raise LaunchError(
            f"model {job.model} is not a HF model directory on this filesystem; compute nodes "
            "have no internet, so put the model on the shared filesystem first"
        )
    for env, store in job.env_stores.items():
        if not Path(store).is_dir():
            raise LaunchError(
                f"env {env!r}: env store {store} does not exist; build the envs on the "
                f"login node first (`caravela env build --store {store}`)"
            )
    gpus = profile.gpus_per_node
    need = job.gpus_per_engine * job.engines_per_node
    if gpus and need != gpus:
        why = (
            "an engine cannot use another node's GPUs"
            if need > gpus
            else f"{gpus - need} would sit idle all run (inference nodes run engines only)"
        )
        raise LaunchError(
            f"inference.backend.engines_per_node = {job.engines_per_node} x "
            f"{job.gpus_per_engine} GPU(s) per engine = {need} GPUs per inference node; "
            f"profile {profile.name!r} has {gpus}, and {why}. Make engines_per_node x GPUs per "
            f"engine (vLLM's tensor_parallel_size; 1 for the transformers backend) exactly "
            f"{gpus}, e.g. engines_per_node = {gpus} with tensor_parallel_size = 1"
        )
    if gpus and job.ranks_per_node > gpus:
        raise LaunchError(
            f"trainer.ranks_per_node = {job.ranks_per_node}, but each trainer rank takes one "
            f"GPU and profile {profile.name!r} has {gpus} per node: lower it to {gpus}, or "
            "unset it (the default on a GPU profile is one rank per GPU)"
        )


def render(job: JobRequest, profile: SiteProfile) -> str:
    """The sbatch script for ``job`` on ``profile``'s cluster (checked first)."""
    check(job, profile)
    run_dir = Path(job.run_dir)
    bindir = (profile.venv / "bin") if profile.venv else Path(sys.executable).parent
    wrap = ""
    if profile.apptainer_image:
        wrap = f"apptainer exec --nv --bind {run_dir} {profile.apptainer_image} "
    s = job.slurm
    directives = [
        f"#SBATCH --{key}={value}"
        for key, value in (
            ("partition", profile.partition),
            ("account", profile.account),
            ("qos", profile.qos),
            ("gres", f"gpu:{profile.gpus_per_node}" if profile.gpus_per_node else None),
        )
        if value
    ]
    setup = "\n".join(f"module load {shlex.quote(m)}" for m in profile.modules)
    return Template(TEMPLATE.read_text()).substitute(
        job_name=s.job_name,
        nodes=s.nodes,
        cpus_per_node=profile.cpus_per_node,
        time=s.time,
        run_dir=shlex.quote(str(run_dir)),
        signal_seconds=s.signal_seconds,
        extra_directives="\n".join(directives),
        setup=setup,
        python=wrap + shlex.quote(str(bindir / "python")),
        ray=wrap + shlex.quote(str(bindir / "ray")),
        caravela=wrap + shlex.quote(str(bindir / "caravela")),
        node_tmp=profile.node_tmp,
        ray_port=s.ray_port,
        inference_nodes=s.inference_nodes,
        head_wait=5,
        join_timeout=s.join_timeout,
        checkpoint_wait=s.checkpoint_wait,
    )


def write(run_dir: Path, script: str, config_json: str) -> Path:
    """Write ``config.json`` and ``job.sbatch`` into the run directory; returns the script."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config_json)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    return path


def submit(path: Path) -> int:
    """``sbatch`` the script; prints the job id and how to reach the dashboard."""
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"caravela slurm: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return 1
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; output: {Path(path).parent}/slurm-{job}.out")
    print("dashboard: once running, `squeue -j JOB -o %N` names the nodes; then")
    print("  ssh -L 8265:127.0.0.1:8265 <first node>   and open http://127.0.0.1:8265")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", required=True, metavar="SLURM_COMMAND")
    for name, text in (("render", "write the sbatch script"), ("submit", "render, then sbatch")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="?", type=Path)
        p.add_argument("--set", dest="overrides", action="append", default=[])
        if name == "render":
            p.add_argument("--dry-run", action="store_true", help="print, write nothing")
