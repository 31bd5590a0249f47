"""Build each env's venv with uv into a content-addressed store shared by runs and nodes.

An env's build hash covers its manifest, lock file and every source file, the
worker shim and the Python version: the same content is built once and found
again by every run and node that points at the same store (a shared filesystem
on clusters). A store entry ``<name>-<hash>/`` holds ``venv/`` (relocatable,
with the ``caravela_env_worker`` shim copied into its site-packages), ``src/`` (a
copy of the env directory, so editing it later changes the hash rather than a
running env) and ``build.json``. Builds go to a temporary directory renamed into
place at the end, under a file lock, so a crashed or concurrent build never
leaves a half-built entry behind.

Air-gapped compute nodes: build on the login node (``caravela env build``), or
build offline from a read-only wheelhouse (``--offline --wheelhouse DIR``,
installs with ``--no-index --find-links``); a read-only uv cache does not work
(uv takes a lock in it, DESIGN.md).

What gets installed is read by ``reward_envs.requirements`` before anything runs (an option or
URL an env is not allowed refuses the build, naming the file and line); uv gets a file written
from that reading, the index of the ``RequirementPolicy`` (or the wheelhouse), ``--no-config``
and an environment without ``UV_*``/``PIP_*`` settings, so nothing an env ships and no setting
outside Caravela's chooses where packages come from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import TypeAdapter

from reward_envs import containers
from reward_envs.config import Isolation
from reward_envs.manifest import Manifest, load_manifest
from reward_envs.requirements import (
    RequirementError,
    RequirementPolicy,
    Requirements,
    read_env_requirements,
)

_ISOLATION: TypeAdapter[Isolation] = TypeAdapter(Isolation)

SHIM_FILES = ("protocol.py", "worker.py")
SHIM_PACKAGE = "caravela_env_worker"
KEEP_ENV = {"UV_CACHE_DIR"}
"""The only ``UV_*``/``PIP_*`` variables a build passes on to uv (where its cache is)."""
INSTALL_FILE = "install-requirements.txt"
CONSTRAINTS_FILE = "install-constraints.txt"
HERE = Path(__file__).resolve().parent


class EnvBuildError(RuntimeError):
    """An env could not be built; the message names the env and what failed."""


@dataclass(frozen=True)
class BuiltEnv:
    """Everything a pool needs to start workers for one env."""

    name: str
    build_hash: str
    python: str
    """Interpreter the workers run (the env venv's, or Caravela's for process isolation)."""
    src: str
    """Env source directory put first on the worker's sys.path."""
    worker_module: str
    """``python -m`` target of the worker."""
    isolated: bool
    """Run the interpreter with ``-I`` (nothing from Caravela's environment leaks in)."""
    backend: str = "local"
    """local (a process here), docker or apptainer (see ``containers.py``)."""
    container: tuple[tuple[str, str], ...] = ()
    """Container settings as (key, value) pairs: image, limits, host paths to mount."""

    def command(self, manifest: Manifest, slot: str = "") -> list[str]:
        """The worker's argv; ``slot`` names the worker's container (docker)."""
        flags = ["-I"] if self.isolated else []
        worker = [
            self.python,
            *flags,
            "-m",
            self.worker_module,
            "--env-dir",
            self.src,
            "--entry",
            manifest.entry_point,
            "--api",
            manifest.api,
        ]
        if self.backend == "local":
            return worker
        return containers.wrap(self.backend, dict(self.container), slot, worker)


def default_store() -> Path:
    """``$CARAVELA_ENV_STORE``, else ``~/.cache/caravela/envs``."""
    env = os.environ.get("CARAVELA_ENV_STORE")
    return Path(env) if env else Path.home() / ".cache" / "caravela" / "envs"


def _source_files(env_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in env_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def content_hash(env_dir: Path) -> str:
    """Hash of the env's files, the worker shim and the Python version (16 hex digits)."""
    env_dir = Path(env_dir)
    h = hashlib.sha256(f"python {sys.version_info.major}.{sys.version_info.minor}\n".encode())
    for name in SHIM_FILES:
        h.update((HERE / name).read_bytes())
    for f in _source_files(env_dir):
        h.update(str(f.relative_to(env_dir)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def process_env(env_dir: Path) -> BuiltEnv:
    """Process isolation: Caravela's own interpreter, the env directory as is."""
    manifest = load_manifest(env_dir)
    return BuiltEnv(
        name=manifest.name,
        build_hash=content_hash(env_dir),
        python=sys.executable,
        src=str(Path(env_dir).resolve()),
        worker_module="reward_envs.worker",
        isolated=False,
    )


def _entry(root: Path, manifest: Manifest, digest: str) -> BuiltEnv:
    return BuiltEnv(
        name=manifest.name,
        build_hash=digest,
        python=str(root / "venv" / "bin" / "python"),
        src=str(root / "src"),
        worker_module=SHIM_PACKAGE,
        isolated=True,
    )


def find_built(env_dir: Path, store: Path) -> BuiltEnv | None:
    """The store entry for this exact env content, if it was built."""
    manifest = load_manifest(env_dir)
    digest = content_hash(env_dir)
    root = Path(store) / f"{manifest.name}-{digest}"
    return _entry(root, manifest, digest) if (root / "build.json").exists() else None


def _uv() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


def uv_environ() -> dict[str, str]:
    """Caravela's environment without uv's and pip's settings (indexes, find-links, config
    files), which would otherwise choose where packages come from; ``KEEP_ENV`` stays."""
    env = {
        k: v for k, v in os.environ.items() if k in KEEP_ENV or not k.startswith(("UV_", "PIP_"))
    }
    return {**env, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}


def _run(
    cmd: list[str], manifest: Manifest, what: str, hint: str = "", names: Sequence[str] = ()
) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=uv_environ())
    if proc.returncode != 0:
        err = proc.stderr.strip()
        named = [r for r in names if _req_name(r) in err.lower()]
        culprit = f" (failing: {', '.join(named)})" if named else ""
        raise EnvBuildError(f"env {manifest.name!r}: {what} failed{culprit}.{hint}\n{err[-3000:]}")


def _req_name(requirement: str) -> str:
    name = requirement.strip()
    for sep in "<>=!~[; @":
        name = name.split(sep)[0]
    return name.lower().replace("_", "-")


def build(
    env_dir: Path,
    store: Path | None = None,
    offline: bool = False,
    wheelhouse: Path | None = None,
    policy: RequirementPolicy | None = None,
) -> BuiltEnv:
    """Build (or find) the env's venv in ``store``; returns the entry. What it installs is
    checked against ``policy`` (default: nothing but plain requirements) first, even when
    the env is built already: ``EnvBuildError`` names the file and line refused."""
    env_dir = Path(env_dir).resolve()
    manifest = load_manifest(env_dir)
    policy = policy or RequirementPolicy()
    try:
        reqs = read_env_requirements(env_dir, manifest.requirements, manifest.lock, policy)
    except RequirementError as e:
        raise EnvBuildError(f"env {manifest.name!r}: refused before building: {e}") from None
    store = Path(store or default_store())
    found = find_built(env_dir, store)
    if found is not None:
        return found
    digest = content_hash(env_dir)
    root = store / f"{manifest.name}-{digest}"
    (store / ".locks").mkdir(parents=True, exist_ok=True)
    with open(store / ".locks" / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "build.json").exists():  # built by someone else while we waited
            return _entry(root, manifest, digest)
        tmp = store / f".tmp-{root.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            index = _build_into(tmp, env_dir, manifest, reqs, policy, offline, wheelhouse)
            record = {
                "name": manifest.name,
                "version": manifest.version,
                "build_hash": digest,
                "requirements": manifest.requirements,
                "lock": manifest.lock,
                "installed": reqs.requirements,
                "constraints": reqs.constraints,
                "index": index,
                "python": sys.version.split()[0],
                "offline": offline,
                "wheelhouse": str(wheelhouse) if wheelhouse else None,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / "build.json").write_text(json.dumps(record, indent=2))
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _entry(root, manifest, digest)


def _build_into(
    tmp: Path,
    env_dir: Path,
    manifest: Manifest,
    reqs: Requirements,
    policy: RequirementPolicy,
    offline: bool,
    wheelhouse: Path | None,
) -> list[str]:
    """Make the venv in ``tmp`` and install ``reqs`` into it; the sources it installed from."""
    uv = _uv()
    base = getattr(sys, "_base_executable", sys.executable)
    venv = [uv, "venv", "--no-config", "--relocatable", "--python", base, str(tmp / "venv")]
    _run(venv, manifest, "uv venv")
    python = str(tmp / "venv" / "bin" / "python")
    sources: list[str] = []
    if reqs.requirements:
        (tmp / INSTALL_FILE).write_text("\n".join(reqs.requirements) + "\n")
        cmd = [uv, "pip", "install", "--no-config", "--python", python]
        cmd += ["-r", str(tmp / INSTALL_FILE)]
        if reqs.constraints:
            (tmp / CONSTRAINTS_FILE).write_text("\n".join(reqs.constraints) + "\n")
            cmd += ["-c", str(tmp / CONSTRAINTS_FILE)]
        what, hint = f"installing {' '.join(reqs.names())}", ""
        if wheelhouse:
            sources = [str(wheelhouse)]
            cmd += ["--offline", "--no-index", "--find-links", str(wheelhouse)]
            what += f" offline from the wheelhouse {wheelhouse} (no package index)"
            hint = (
                f" Add the missing wheels to {wheelhouse} on a machine with internet "
                f"(`pip download -d {wheelhouse} <requirement>`), or build the env there "
                "(`caravela env build`)."
            )
        else:
            index = reqs.index_url or policy.index_url
            sources = [*reqs.extra_index_urls, index]
            cmd += ["--default-index", index]
            for url in reqs.extra_index_urls:
                cmd += ["--index", url]
            if offline:
                cmd.append("--offline")
                what += " offline (uv cache only)"
        for links in reqs.find_links:
            cmd += ["--find-links", links]
        sources += reqs.find_links
        _run(cmd, manifest, what, hint, reqs.names())
    shutil.copytree(env_dir, tmp / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    install_shim(next((tmp / "venv" / "lib").glob("python3*/site-packages")))
    return sources


def install_shim(target: Path) -> Path:
    """Write the ``caravela_env_worker`` package (two stdlib files) into ``target``."""
    shim = Path(target) / SHIM_PACKAGE
    shim.mkdir(parents=True, exist_ok=True)
    for name in SHIM_FILES:
        shutil.copy2(HERE / name, shim / name)
    (shim / "__init__.py").write_text('"""Caravela env worker shim (stdlib only)."""\n')
    (shim / "__main__.py").write_text(
        "import sys\n\nfrom caravela_env_worker.worker import main\n\nsys.exit(main())\n"
    )
    return Path(target)


def shim_dir(store: Path | None = None) -> Path:
    """A directory holding the shim package, for mounting into containers (one per content)."""
    digest = hashlib.sha256(b"".join((HERE / n).read_bytes() for n in SHIM_FILES)).hexdigest()
    path = Path(store or default_store()) / f"_shim-{digest[:16]}"
    if not (path / SHIM_PACKAGE / "__main__.py").exists():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        install_shim(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def prepare(env_dir: Path, isolation: Isolation | str, store: Path | None = None) -> BuiltEnv:
    """What a pool runs for ``env_dir`` under ``isolation`` (a config or just its type):
    found in the store or built now; for containers, the engine and image are checked."""
    if isinstance(isolation, str):
        isolation = _ISOLATION.validate_python({"type": isolation})
    if isolation.type == "process":
        return process_env(env_dir)
    if isolation.type == "venv":
        return build(
            env_dir,
            isolation.store or store,
            offline=isolation.offline,
            wheelhouse=isolation.wheelhouse,
            policy=isolation.requirements,
        )
    name = load_manifest(env_dir).name
    build_hash, settings = containers.prepare_container(
        name, env_dir, isolation, shim_dir(store), content_hash(env_dir)
    )
    return BuiltEnv(
        name=name,
        build_hash=build_hash,
        python="python3",  # the image's
        src=containers.ENV_MOUNT,
        worker_module=SHIM_PACKAGE,
        isolated=False,
        backend=isolation.type,
        container=tuple(sorted(settings.items())),
    )


def describe(entry: BuiltEnv) -> dict[str, object]:
    return asdict(entry)
