"""Settings of one env API server: where its state lives and the limits it enforces."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.config import StrictModel
from reward_envs.requirements import RequirementPolicy


class ApiSettings(StrictModel):
    """What ``create_app`` needs; everything else is derived from ``state_dir``."""

    state_dir: Path
    """Holds ``registry.json``, ``api-token`` and the files of inline-registered envs."""
    store: Path | None = None
    """Env build store for venv isolation; None = ``$CARAVELA_ENV_STORE`` or
    ``~/.cache/caravela/envs`` (``reward_envs.builder.default_store``)."""
    offline: bool = False
    """Build venvs without network access (uv ``--offline``): from the uv cache or
    ``wheelhouse``. A build that needs anything else fails, with the reason."""
    wheelhouse: Path | None = None
    """Directory of wheels venvs are built from with no package index (``--no-index
    --find-links``; implies ``offline``): how an air-gapped head node builds."""
    requirements: RequirementPolicy = Field(default_factory=RequirementPolicy)
    """The index venv builds install from, and what registered envs' requirement files may
    name beyond plain requirements: ``index_url``, ``allow_index_urls``, ``allow_find_links``,
    ``allow_includes`` (default: PyPI; no option, URL, path or include). A registration
    naming anything else is refused with 422 naming the file and line."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger ones get 413."""
    pool_workers: int = Field(2, ge=1, le=64)
    """Workers in each ready env's warm pool (capped by the manifest's ``concurrency``)."""
    build_workers: int = Field(2, ge=1, le=16)
    """Registrations built and canaried at once; more wait in the queue as ``building``."""

    @property
    def registry_file(self) -> Path:
        return self.state_dir / "registry.json"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "api-token"

    @property
    def inline_dir(self) -> Path:
        return self.state_dir / "envs"
