"""``caravela slurm render|submit``, the orchestrator's half: a run config, resolved for the
cluster, handed to the launcher.

``slurm/`` renders and starts (STYLE.md, point 9) and never reads a run config. This
module does: it applies the site profile's defaults (every GPU placed, generation
overlapping training), Ray mode and an absolute run directory, passes the launcher the few
facts it checks (``slurm.render.JobRequest``), and writes the resolved config next to the
script for the job's ``caravela run`` to load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator import rundir
from orchestrator.config import ConfigError, RunConfig, load_config
from reward_envs.builder import default_store
from slurm import render as launcher
from slurm.config import SiteProfile, load_profile


def _defaults(section: BaseModel, values: dict[str, Any]) -> Any:
    """``section`` with ``values`` for the fields the run config left unset (set ones win)."""
    unset = {k: v for k, v in values.items() if k not in section.model_fields_set}
    return section.model_copy(update=unset)


def resolve(cfg: RunConfig, profile: SiteProfile) -> RunConfig:
    """The config the job runs: Ray mode, an absolute run dir, and the site's defaults for
    what the run config leaves unset.

    - ``trainer.gradient_checkpointing``: the profile's;
    - on a GPU profile every GPU gets work: ``trainer.ranks_per_node`` = the node's GPUs (one
      rank per GPU), and ``inference.backend.engines_per_node`` = the node's GPUs / GPUs per
      engine (when that divides; ``slurm.render.check`` refuses anything but all of them);
    - engines and trainer ranks are on different nodes, so generating step s+1 overlaps
      training step s: ``rollout.max_staleness = 1`` (the trainer GPUs do not wait for
      generation, nor the inference GPUs for training);
    - ``inference.backend.type = "auto"`` becomes vllm or transformers here, as the driver
      would decide it on the inference node (``AutoBackend.resolve``) but from what is known
      for certain: whether the profile's nodes have GPUs and the job's venv has vllm, not
      whether the driver's job step sees the GPUs. In an Apptainer image on GPU nodes the
      driver decides (inside the image);
    - compute nodes have no internet, so envs registered mid-run (``env_api``) are built on
      the head node offline: ``env_api.offline = True`` (from the run's wheelhouse if it has
      one, else the uv cache only).
    """
    gpus = profile.gpus_per_node
    trainer: dict[str, Any] = {"gradient_checkpointing": profile.gradient_checkpointing}
    engines: dict[str, Any] = {}
    if gpus:
        trainer["ranks_per_node"] = gpus
        per_engine = cfg.inference.backend.gpus_per_engine
        if gpus % per_engine == 0:
            engines["engines_per_node"] = gpus // per_engine
    backend = _defaults(cfg.inference.backend, engines)
    if backend.type == "auto":
        vllm = profile.job_has_package("vllm")
        if not gpus or vllm is not None:
            backend = backend.resolve(cuda=bool(gpus), vllm=bool(vllm))
    return cfg.model_copy(
        update={
            "output_dir": Path(cfg.output_dir).resolve(),
            "trainer": _defaults(cfg.trainer, trainer),
            "inference": cfg.inference.model_copy(update={"backend": backend}),
            "rollout": _defaults(cfg.rollout, {"max_staleness": 1}),
            "env_api": _defaults(cfg.env_api, {"offline": True}),
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
    run_dir = Path(cfg.output_dir).resolve()
    prepared = cfg.prepared_dir or os.environ.get("CARAVELA_DATA_STORE") or run_dir / "prepared"
    data = [
        *(Path(d.path).resolve().parent for d in cfg.datasets),
        *(Path(s.file).resolve().parent for s in cfg.eval.resolved()),
        Path(prepared).resolve(),
        *(Path(e.path).resolve() for e in cfg.envs),
        Path(cfg.env_api.state_dir or run_dir / "env-api").resolve(),
    ]
    return launcher.JobRequest(
        slurm=cfg.slurm,
        run_dir=run_dir,
        model=Path(cfg.model),
        env_stores=stores,
        engines_per_node=backend.engines_per_node,
        gpus_per_engine=backend.gpus_per_engine,
        ranks_per_node=cfg.trainer.ranks_per_node,
        data=tuple(data),
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
        script, resolved = render(cfg)  # every check of the request first
        # the job always resumes what its run directory holds: a new run must not land on
        # an old one unless asked (the same rule as ``caravela run``)
        out = Path(resolved.output_dir)
        rundir.claim(out, args.resume, args.overwrite, log=print)
        path = launcher.write(out, script, resolved.model_dump_json(indent=2))
    except (ConfigError, launcher.LaunchError, ValueError) as e:
        print(f"caravela slurm: {e}", file=sys.stderr)
        return 2
    if args.slurm_command == "render":
        print(path)
        return 0
    return launcher.submit(path)
