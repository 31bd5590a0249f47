"""``caravela slurm render|submit``: the sbatch script for a run, checked before submission.

The launcher only renders and starts: it writes the resolved run config into the run
directory and the script next to it, and (``submit``) hands the script to ``sbatch``.
Everything that can be wrong with the request is an error here, on the login node,
not minutes later on the compute nodes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

from orchestrator.config import RunConfig
from reward_envs.builder import default_store
from slurm.config import SiteProfile, load_profile

TEMPLATE = Path(__file__).resolve().parent / "caravela.sbatch"


class LaunchError(ValueError):
    """The job cannot work as configured; the message says what to change."""


def check(cfg: RunConfig, profile: SiteProfile) -> None:
    s = cfg.slurm
    trainers = s.nodes - s.inference_nodes
    if trainers < 1:
        raise LaunchError(
            f"slurm.nodes = {s.nodes} with slurm.inference_nodes = {s.inference_nodes} leaves "
            "zero trainer nodes; raise slurm.nodes or lower slurm.inference_nodes"
        )
    if not (Path(cfg.model) / "config.json").exists():
        raise LaunchError(
            f"model {cfg.model} is not a HF model directory on this filesystem; compute nodes "
            "have no internet, so put the model on the shared filesystem first"
        )
    for env in cfg.envs:
        if env.isolation.type == "venv":
            store = env.isolation.store or default_store()
            if not Path(store).is_dir():
                raise LaunchError(
                    f"env {env.name!r}: env store {store} does not exist; build the envs on the "
                    f"login node first (`caravela env build --store {store}`)"
                )
    backend = cfg.inference.backend
    if profile.gpus_per_node and backend.type == "vllm":
        need = backend.tensor_parallel_size * backend.engines_per_node
        if need > profile.gpus_per_node:
            raise LaunchError(
                f"{backend.engines_per_node} engine(s) x tensor_parallel_size "
                f"{backend.tensor_parallel_size} need {need} GPUs per inference node; profile "
                f"{profile.name!r} has {profile.gpus_per_node}"
            )


def render(cfg: RunConfig) -> tuple[str, RunConfig]:
    """The sbatch script and the resolved config it runs (checked first)."""
    profile = load_profile(cfg.slurm.profile)
    check(cfg, profile)
    run_dir = Path(cfg.output_dir).resolve()
    trainer = cfg.trainer.model_copy(
        update={"gradient_checkpointing": profile.gradient_checkpointing}
    )
    resolved = cfg.model_copy(
        update={
            "output_dir": run_dir,
            "trainer": trainer,
            "cluster": cfg.cluster.model_copy(update={"mode": "ray", "allow_network": True}),
        }
    )
    bindir = (profile.venv / "bin") if profile.venv else Path(sys.executable).parent
    wrap = ""
    if profile.apptainer_image:
        wrap = f"apptainer exec --nv --bind {run_dir} {profile.apptainer_image} "
    s = cfg.slurm
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
    script = Template(TEMPLATE.read_text()).substitute(
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
    return script, resolved


def write(cfg: RunConfig) -> Path:
    """Write ``config.json`` and ``job.sbatch`` into the run directory; returns the script."""
    script, resolved = render(cfg)
    run_dir = Path(resolved.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2))
    path = run_dir / "job.sbatch"
    path.write_text(script)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", required=True, metavar="SLURM_COMMAND")
    for name, text in (("render", "write the sbatch script"), ("submit", "render, then sbatch")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="?", type=Path)
        p.add_argument("--set", dest="overrides", action="append", default=[])
        if name == "render":
            p.add_argument("--dry-run", action="store_true", help="print, write nothing")


def main(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.slurm_command == "render" and args.dry_run:
            print(render(cfg)[0])
            return 0
        path = write(cfg)
    except (ConfigError, LaunchError, ValueError) as e:
        print(f"caravela slurm: {e}", file=sys.stderr)
        return 2
    if args.slurm_command == "render":
        print(path)
        return 0
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"caravela slurm: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return 1
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; output: {Path(path).parent}/slurm-{job}.out")
    print("dashboard: once running, `squeue -j JOB -o %N` names the nodes; then")
    print("  ssh -L 8265:127.0.0.1:8265 <first node>   and open http://127.0.0.1:8265")
    return 0
