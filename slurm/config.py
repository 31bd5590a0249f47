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
    modules: list[str] = Field(default_factory=list)
    """``module load`` lines run first (e.g. CUDA)."""
    apptainer_image: Path | None = None
    """Run Ray and Caravela inside this image (``apptainer exec --nv IMAGE``) when set."""
    node_tmp: str = "/tmp"
    """Node-local scratch for Ray's temp dir (shell expression, e.g. ``$TMPDIR``)."""
    venv: Path | None = None
    """Caravela's venv on the shared filesystem (default: the one rendering the script)."""

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
    signal_seconds: int = Field(300, ge=60)
    """USR1 this many seconds before the limit (it may come up to 60 s early): checkpoint,
    then requeue."""
    checkpoint_wait: int = Field(240, ge=10)
    """Seconds the USR1 handler waits for the checkpoint before requeueing anyway."""
    ray_port: int = Field(6379, ge=1024, le=65535)
    """Ray head's GCS port (not 8265 or 10001: the head's dashboard and client server)."""
    join_timeout: int = Field(300, ge=10)
    """Seconds for every node to join the Ray cluster before the job fails."""

    @field_validator("ray_port")
    @classmethod
    def _port_is_free(cls, port: int) -> int:
        if port in (8265, 10001):
            raise ValueError(
                f"port {port} is the Ray head's dashboard or client server; pick another"
            )
        return port


def load_profile(name_or_path: str) -> SiteProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise ValueError(f"no SLURM profile {name_or_path!r}; known: {known}, or a TOML path")
    return SiteProfile.model_validate(tomllib.loads(path.read_text()))
