"""The ``slurm`` section of a run config, and site profiles (``slurm/profiles/*.toml``)."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from pydantic import Field, field_validator

from common.config import StrictModel

PROFILES = Path(__file__).resolve().parent / "profiles"


class SiteProfile(StrictModel):
    """What differs between clusters: partition, account, GPUs, modules, local scratch."""

    name: str
    """Profile name."""
    partition: str | None = None
    """``#SBATCH --partition``."""
    account: str | None = None
    """``#SBATCH --account`` (your project)."""
    qos: str | None = None
    """``#SBATCH --qos``."""
    gpus_per_node: int = Field(0, ge=0, le=16)
    """GPUs per node (``--gres=gpu:N``); 0 on CPU clusters."""
    cpus_per_node: int = Field(2, ge=1)
    """CPUs given to each node's task."""
    gradient_checkpointing: bool = False
    """The site's default for ``trainer.gradient_checkpointing`` (a run config may override)."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More ``#SBATCH`` options for every job on this site (``["--exclusive"]``); a run's
    ``slurm.extra_sbatch`` comes after them."""
    modules: list[str] = Field(default_factory=list)
    """Modules Ray and Caravela need (``module load``): loaded in the batch shell, whose
    environment every step inherits; with ``apptainer_image``, inside the image instead
    (``bash -c 'module load ...'`` in it: the image must have the ``module`` command, or
    the site's one bound in with ``apptainer_binds``)."""
    apptainer_image: Path | None = None
    """Run Ray and Caravela inside this image (``apptainer exec IMAGE``, ``--nv`` on GPU
    nodes) when set, with the venv, model, env stores, data, run directory and node-local
    scratch bound in."""
    apptainer_modules: list[str] = Field(default_factory=list)
    """Modules loaded on the host before ``apptainer`` runs (the one providing it, if any)."""
    apptainer_binds: list[str] = Field(default_factory=list)
    """More ``--bind`` paths for the image (``/apps`` for the site's modules)."""
    node_tmp: str = "/tmp"
    """Node-local scratch for Ray's temp dir: a shell expression (``$TMPDIR``) expanded on
    each node, in that node's own step."""
    ray_interface: str | None = None
    """Network interface whose IPv4 address every Ray node uses (``--node-ip-address``),
    looked up on each node: the fast fabric (``ib0``: IPoIB on MN5) carries batches and
    weights. None: the head's SLURM ``NodeAddr``, and Ray's own pick on the other nodes."""
    venv: Path | None = None
    """Caravela's venv on the shared filesystem (default: the one rendering the script)."""

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, options: list[str]) -> list[str]:
        return [_sbatch_option(o) for o in options]

    def job_has_package(self, name: str) -> bool | None:
        """Whether the job's Python can import the package ``name`` (found, not imported):
        ``venv``'s, else this one's; None inside an Apptainer image (not known here)."""
        if self.apptainer_image is not None:
            return None
        if self.venv is None:
            return importlib.util.find_spec(name) is not None
        return any((self.venv / "lib").glob(f"python3*/site-packages/{name}/__init__.py"))


class SlurmConfig(StrictModel):
    """How the run is laid out on a SLURM allocation."""

    profile: str = "generic"
    """A profile name in ``slurm/profiles`` (mn5, deucalion, generic) or a TOML path."""
    nodes: int = Field(2, ge=2, le=512)
    """Nodes in the job: ``inference_nodes`` run engines, the rest train and score."""
    inference_nodes: int = Field(1, ge=1, le=2)
    """Nodes running vLLM engines (1-2)."""
    time: str = Field("02:00:00", pattern=r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
    """Wall-time limit, ``[D-]HH:MM:SS``."""
    job_name: str = Field("caravela", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """``#SBATCH --job-name``."""
    account: str | None = None
    """``#SBATCH --account`` (your project); None: the profile's."""
    qos: str | None = None
    """``#SBATCH --qos``; None: the profile's."""
    partition: str | None = None
    """``#SBATCH --partition``; None: the profile's."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More ``#SBATCH`` options, one per entry (``["--mail-type=END",
    "--constraint=highmem"]``), after the profile's. The options the job is built on
    (nodes, tasks, CPUs, GPUs, time, output, requeue, signal) are set by the fields above."""
    signal_seconds: int = Field(300, ge=60)
    """USR1 this many seconds before the limit (it may come up to 60 s early): checkpoint,
    then requeue."""
    checkpoint_wait: int = Field(240, ge=10)
    """Seconds the USR1 handler waits for the checkpoint before requeueing anyway."""
    ray_port: int = Field(6379, ge=1024, le=65535)
    """Ray head's GCS port (not 8265 or 10001: the head's dashboard and client server)."""
    join_timeout: int = Field(300, ge=10)
    """Seconds for every node to join the Ray cluster before the job fails."""

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, options: list[str]) -> list[str]:
        return [_sbatch_option(o) for o in options]

    @field_validator("ray_port")
    @classmethod
    def _port_is_free(cls, port: int) -> int:
        if port in (8265, 10001):
            raise ValueError(
                f"port {port} is the Ray head's dashboard or client server; pick another"
            )
        return port


# Options the rendered job sets itself (from the fields named) and depends on.
OWN_OPTIONS = {
    "nodes": "slurm.nodes",
    "N": "slurm.nodes",
    "ntasks": "the job (one task per node)",
    "n": "the job (one task per node)",
    "ntasks-per-node": "the job (one task per node)",
    "cpus-per-task": "the profile's cpus_per_node",
    "c": "the profile's cpus_per_node",
    "gres": "the profile's gpus_per_node",
    "gpus": "the profile's gpus_per_node",
    "G": "the profile's gpus_per_node",
    "gpus-per-node": "the profile's gpus_per_node",
    "time": "slurm.time",
    "t": "slurm.time",
    "output": "the job (<run>/slurm-%j.out)",
    "o": "the job (<run>/slurm-%j.out)",
    "error": "the job (<run>/slurm-%j.out)",
    "e": "the job (<run>/slurm-%j.out)",
    "open-mode": "the job (append, across requeues)",
    "requeue": "the job",
    "no-requeue": "the job (it requeues itself)",
    "signal": "slurm.signal_seconds",
    "job-name": "slurm.job_name",
    "J": "slurm.job_name",
    "account": "slurm.account",
    "A": "slurm.account",
    "qos": "slurm.qos",
    "q": "slurm.qos",
    "partition": "slurm.partition",
    "p": "slurm.partition",
}


def _sbatch_option(option: str) -> str:
    """One extra ``#SBATCH`` option, checked: an option, on one line, not one the job sets."""
    option = option.strip()
    if not option.startswith("-") or "\n" in option:
        raise ValueError(
            f"{option!r} is not an sbatch option: give one option per entry, as on the "
            "command line (e.g. '--constraint=highmem')"
        )
    name = option.lstrip("-").split("=", 1)[0].split(" ", 1)[0]
    if name in OWN_OPTIONS:
        raise ValueError(
            f"{option!r}: the job sets --{name} itself, from {OWN_OPTIONS[name]}; set that instead"
        )
    return option


def load_profile(name_or_path: str) -> SiteProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise ValueError(f"no SLURM profile {name_or_path!r}; known: {known}, or a TOML path")
    return SiteProfile.model_validate(tomllib.loads(path.read_text()))
