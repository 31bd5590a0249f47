"""``caravela slurm render|submit``, the orchestrator's half: a run config, resolved for the
cluster, handed to the launcher.

``slurm/`` renders and starts (STYLE.md, point 9) and never reads a run config. This
module does: it applies the site profile's trainer defaults, Ray mode and an absolute run
directory, passes the launcher the few facts it checks (``slurm.render.JobRequest``), and
writes the resolved config next to the script for the job's ``caravela run`` to load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.config import ConfigError, RunConfig, load_config
from reward_envs.builder import default_store
from slurm import render as launcher
from slurm.config import SiteProfile, load_profile


def resolve(cfg: RunConfig, profile: SiteProfile) -> RunConfig:
    """The config the job runs: Ray mode, the site's trainer defaults, an absolute run dir."""
    trainer = cfg.trainer.model_copy(
        update={"gradient_checkpointing": profile.gradient_checkpointing}
    )
    return cfg.model_copy(
        update={
            "output_dir": Path(cfg.output_dir).resolve(),
            "trainer": trainer,
            "cluster": cfg.cluster.model_copy(update={"mode": "ray", "allow_network": True}),
        }
    )


def job_request(cfg: RunConfig) -> launcher.JobRequest:
    """What the launcher checks and renders of ``cfg``."""
    stores = {}
    for env in cfg.envs:
        isolation = env.resolved_isolation()  # None in the config: the manifest's
        if isolation.type == "venv":
            stores[env.name] = Path(isolation.store or default_store())
    backend = cfg.inference.backend
    return launcher.JobRequest(
        slurm=cfg.slurm,
        run_dir=Path(cfg.output_dir).resolve(),
        model=Path(cfg.model),
        env_stores=stores,
        engines_per_node=backend.engines_per_node,
        gpus_per_engine=backend.tensor_parallel_size if backend.type == "vllm" else 0,
    )


def render(cfg: RunConfig) -> tuple[str, RunConfig]:
    """The sbatch script and the resolved config it runs (checked first)."""
    profile = load_profile(cfg.slurm.profile)
    resolved = resolve(cfg, profile)
    return launcher.render(job_request(resolved), profile), resolved


def write(cfg: RunConfig) -> Path:
    """Write ``config.json`` and ``job.sbatch`` into the run directory; returns the script."""
    script, resolved = render(cfg)
    return launcher.write(Path(resolved.output_dir), script, resolved.model_dump_json(indent=2))


def main(args: argparse.Namespace) -> int:
    """``caravela slurm render|submit [CONFIG] [--set ...]``."""
    try:
        cfg = load_config(args.config, args.overrides)
        if args.slurm_command == "render" and args.dry_run:
            print(render(cfg)[0])
            return 0
        path = write(cfg)
    except (ConfigError, launcher.LaunchError, ValueError) as e:
        print(f"caravela slurm: {e}", file=sys.stderr)
        return 2
    if args.slurm_command == "render":
        print(path)
        return 0
    return launcher.submit(path)
