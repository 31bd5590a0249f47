"""``caravela slurm render|submit``: the sbatch script for a run, checked before submission.

The launcher only renders and starts: it writes the resolved run config into the run
directory and the script next to it, and (``submit``) hands the script to ``sbatch``.
Everything that can be wrong with the request is an error here, on the login node,
not minutes later on the compute nodes; what only a node knows (its CPUs, GPUs, network
address and scratch) the script checks on each node before Ray starts there. It never
reads a run config itself: the orchestrator resolves one and hands over a ``JobRequest``
and the config's JSON text (``orchestrator/launch.py``).

The template (``caravela.sbatch``) marks what is filled in as ``@{name}``, so the bash in
it reads as it runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from slurm.config import SiteProfile, SlurmConfig

TEMPLATE = Path(__file__).resolve().parent / "caravela.sbatch"
CODE_ROOT = Path(__file__).resolve().parents[1]
"""Where Caravela's packages are (bound into an image when the venv is an editable one)."""
PLACEHOLDER = "CHANGE_ME"


_FILLED_IN = (
    r"@(?:\{(?P<braced>[a-z_][a-z0-9_]*)\}"
    r"|(?P<escaped>(?!))|(?P<named>(?!))|(?P<invalid>(?!)))"
)
"""``@{name}``, nothing else (Template wants all four groups; three never match)."""


class _Script(Template):
    """``@{name}`` placeholders only; bash's ``$`` and ``"$@"`` pass through untouched."""

    delimiter = "@"
    pattern = _FILLED_IN  # type: ignore[assignment]  # a string; Template compiles it


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
    data: tuple[Path, ...] = ()
    """Other paths the run reads or writes (datasets, held-out set, prepared token ids, env
    sources, the env API's state): bound into an Apptainer image."""


def sbatch_options(job: JobRequest, profile: SiteProfile) -> list[tuple[str, str]]:
    """``(field, option)`` for the job's site options: partition, account and qos (the run
    config's ``[slurm]`` over the profile's), GPUs, then the profile's and the run's extra
    options."""
    s = job.slurm
    named = [
        (f"slurm.{key}" if getattr(s, key) else f"profile {profile.name!r}: {key}", key, value)
        for key in ("partition", "account", "qos")
        if (value := getattr(s, key) or getattr(profile, key))
    ]
    options = [(field, f"--{key}={value}") for field, key, value in named]
    if profile.gpus_per_node:
        options.append(("gpus_per_node", f"--gres=gpu:{profile.gpus_per_node}"))
    options += [(f"profile {profile.name!r}: extra_sbatch", o) for o in profile.extra_sbatch]
    options += [("slurm.extra_sbatch", o) for o in s.extra_sbatch]
    return options


def _placeholders(job: JobRequest, profile: SiteProfile) -> list[str]:
    """The settings still holding ``CHANGE_ME`` (a profile's fill-in-this), by field."""
    found = [field for field, option in sbatch_options(job, profile) if PLACEHOLDER in option]
    for key, value in profile:
        if key not in ("partition", "account", "qos", "extra_sbatch") and PLACEHOLDER in str(value):
            found.append(f"profile {profile.name!r}: {key}")
    return found


def check(job: JobRequest, profile: SiteProfile) -> None:
    s = job.slurm
    left = _placeholders(job, profile)
    if left:
        raise LaunchError(
            f"{PLACEHOLDER} is still in {', '.join(left)}: put your project's value in the run "
            "config's [slurm] section (slurm.account, slurm.qos, slurm.partition) or in the "
            "profile"
        )
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


def _venv(profile: SiteProfile) -> Path:
    """The job's venv: the profile's, else the one rendering the script."""
    return profile.venv if profile.venv else Path(sys.prefix)


def binds(job: JobRequest, profile: SiteProfile) -> list[Path]:
    """What the image needs of the host (besides each node's scratch, bound on the node, and
    the profile's ``apptainer_binds``): the run directory, the venv (and its base Python
    unless under ``/usr``; Caravela's code for an editable install), the model, env stores
    and the run's data. Each the path itself, or its closest existing parent when it does
    not exist yet; none inside another."""
    venv = _venv(profile)
    paths = [Path(job.run_dir), venv, Path(job.model), *job.env_stores.values(), *job.data]
    home = _venv_home(venv)
    if home is not None and home.parts[1:2] not in (("usr",), ("bin",)):
        paths.append(home.parent)
    if profile.venv is None and not CODE_ROOT.is_relative_to(venv):
        paths.append(CODE_ROOT)
    found: list[Path] = []
    for path in paths:
        path = Path(path).absolute()
        while not path.exists() and path.parent != path:
            path = path.parent
        if path != Path("/"):
            found.append(path)
    kept = sorted(set(found))
    return [p for p in kept if not any(p != q and p.is_relative_to(q) for q in kept)]


def _venv_home(venv: Path) -> Path | None:
    """The ``home`` of ``venv/pyvenv.cfg`` (its base Python's ``bin``), if it says."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return Path(value.strip())
    return None


def _in_env(job: JobRequest, profile: SiteProfile) -> str:
    """The script's ``in_env`` function: runs a command where Caravela is installed."""
    head = (
        'in_env() {  # run "$@" where Caravela is installed (--exec: in place of this shell)\n'
        '    local how=; [ "$1" != --exec ] || { how=exec; shift; }\n'
    )
    if profile.apptainer_image is None:
        return head + '    $how "$@"  # no image: the venv as it is\n}'
    paths = binds(job, profile)
    bad = [str(p) for p in paths if "," in str(p) or ":" in str(p)]
    if bad:
        raise LaunchError(
            f"cannot bind {bad} into the image (apptainer --bind splits at ',' and ':'); "
            "move them to paths without those characters"
        )
    command = ["apptainer", "exec"] + (["--nv"] if profile.gpus_per_node else [])
    command += ["--bind", ",".join([*(str(p) for p in paths), *profile.apptainer_binds])]
    line = shlex.join(command) + ' --bind "$scratch" ' + shlex.quote(str(profile.apptainer_image))
    if profile.modules:
        loads = " && ".join(f"module load {shlex.quote(m)}" for m in profile.modules)
        line += " bash -c " + shlex.quote(f'{loads} && exec "$@"') + " in-image"
    return (
        head
        + "    local scratch  # the image, with the job's paths and this node's scratch bound\n"
        "    scratch=$(node_scratch) || return 1\n"
        f'    $how {line} "$@"\n'
        "}"
    )


def _module_loads(modules: list[str]) -> str:
    return "\n".join(
        f"module load {shlex.quote(m)} || "
        f'{{ echo "caravela: module load {shlex.quote(m)} failed" >&2; exit 1; }}'
        for m in modules
    )


def render(job: JobRequest, profile: SiteProfile) -> str:
    """The sbatch script for ``job`` on ``profile``'s cluster (checked first)."""
    check(job, profile)
    s = job.slurm
    bindir = _venv(profile) / "bin"
    image = profile.apptainer_image is not None
    host_modules = profile.apptainer_modules if image else profile.modules
    if image and profile.modules:
        note = "# modules for Ray and Caravela: loaded inside the image (in_env)\n"
    else:
        note = ""
    return _Script(TEMPLATE.read_text()).substitute(
        job_name=s.job_name,
        nodes=s.nodes,
        cpus_per_node=profile.cpus_per_node,
        gpus_per_node=profile.gpus_per_node,
        time=s.time,
        run_dir=shlex.quote(str(Path(job.run_dir))),
        signal_seconds=s.signal_seconds,
        directives="\n".join(f"#SBATCH {o}" for _, o in sbatch_options(job, profile)),
        host_setup=(note + _module_loads(host_modules)).strip(),
        in_env=_in_env(job, profile),
        python=shlex.quote(str(bindir / "python")),
        ray=shlex.quote(str(bindir / "ray")),
        caravela=shlex.quote(str(bindir / "caravela")),
        node_tmp=profile.node_tmp,
        node_tmp_text=re.sub(r'([\\"$`])', r"\\\1", profile.node_tmp.replace("'", "")),
        ray_interface=shlex.quote(profile.ray_interface or ""),
        gres_step=f" --gres=gpu:{profile.gpus_per_node}" if profile.gpus_per_node else "",
        ray_port=s.ray_port,
        inference_nodes=s.inference_nodes,
        head_wait=60,
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
        how = p.add_mutually_exclusive_group()
        how.add_argument(
            "--resume",
            action="store_true",
            help="the run directory holds a previous run: the job continues it",
        )
        how.add_argument(
            "--overwrite",
            action="store_true",
            help="the run directory holds a previous run: delete it first",
        )
        if name == "render":
            p.add_argument("--dry-run", action="store_true", help="print, write nothing")
