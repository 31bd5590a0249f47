"""Container isolation backends: ``docker`` (any Docker-API engine) and ``apptainer``.

**docker** (Docker, or podman's Docker-compatible service): one long-lived
container per worker slot, started once (PID 1 sleeps; network off; memory and
pids limits; the env's source at ``/env`` and the worker shim at
``/opt/caravela``, both read-only) and reused when its worker is restarted. The
pool's worker process is a relay in Caravela's own Python
(``python -m reward_envs.containers exec ...``) that starts the worker shim
inside the slot's container through the SDK's exec API and pipes its
stdin/stdout, splitting the engine's multiplexed stream. When the pool kills a
worker (timeout, crash) ``kill_slot`` SIGKILLs every process in the container
but PID 1, so a hung scorer dies and the container stays for the next worker.
``remove_slots`` deletes the containers when the pool closes.

**apptainer** (what HPC sites run): the worker runs under ``apptainer exec
--containall --no-home --net --network none`` with the same two read-only
binds; it is a plain child process, so the pool's process-group kill applies
as for venvs. The binary is not installable on every machine (not here): its
command is rendered and checked, and a real run happens where it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from reward_envs.config import ApptainerIsolation, DockerIsolation

ENV_MOUNT = "/env"
SHIM_MOUNT = "/opt/caravela"


class ContainerEngineError(RuntimeError):
    """No container engine or image to run an env with; the message says what to do."""


def client() -> Any:
    """A Docker SDK client that answers, or an error naming ``DOCKER_HOST``."""
    import docker
    from docker.errors import DockerException

    host = os.environ.get("DOCKER_HOST", "(unset, so unix:///var/run/docker.sock)")
    try:
        c = docker.from_env()
        c.ping()
    except DockerException as e:
        raise ContainerEngineError(
            f"no Docker-API engine answers at DOCKER_HOST={host} ({e}). Start one (Docker, "
            "or as root `podman system service --time=0 unix:///run/podman/podman.sock` and "
            "export DOCKER_HOST=unix:///run/podman/podman.sock), or use isolation venv"
        ) from None
    return c


def prepare_container(
    name: str, env_dir: Path, iso: DockerIsolation | ApptainerIsolation, shim: Path, digest: str
) -> tuple[str, dict[str, str]]:
    """Check the engine and image now (a clear error before any worker starts).

    ``name``: the env's; ``shim``: a directory holding the worker shim package;
    ``digest``: the env's content hash. Returns the build hash (for docker, the content's
    and the image's) and the settings a worker's container is started with (``wrap``).
    """
    settings: dict[str, str] = {
        "env_src": str(Path(env_dir).resolve()),
        "shim": str(shim),
        "image": str(iso.image),
    }
    if iso.type == "docker":
        from docker.errors import ImageNotFound

        try:
            image_id = client().images.get(iso.image).id
        except ImageNotFound:
            raise ContainerEngineError(
                f"env {name!r}: image {iso.image!r} is not in the engine at "
                f"DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')}; load it there "
                "(`docker load`, or `podman import rootfs.tar NAME` with no registry)"
            ) from None
        settings.update(mem_limit=iso.mem_limit, pids_limit=str(iso.pids_limit))
        build_hash = f"{digest}-{image_id.removeprefix('sha256:')[:12]}"
    else:
        if shutil.which(iso.binary) is None:
            raise ContainerEngineError(
                f"env {name!r}: {iso.binary!r} is not on PATH; load the site's "
                "apptainer module, or use isolation venv"
            )
        if not Path(iso.image).exists():
            raise ContainerEngineError(f"env {name!r}: image {iso.image} not found")
        settings.update(binary=iso.binary, extra_args=json.dumps(iso.extra_args))
        build_hash = digest
    return build_hash, settings


def wrap(backend: str, settings: dict[str, str], slot: str, worker: list[str]) -> list[str]:
    """The pool's argv for a worker running ``worker`` inside a container."""
    if backend == "docker":
        return [
            sys.executable,
            "-m",
            "reward_envs.containers",
            "--slot",
            slot,
            "--settings",
            json.dumps(settings),
            "--",
            *worker,
        ]
    return apptainer_command(settings, worker)


def apptainer_command(settings: dict[str, str], worker: list[str]) -> list[str]:
    return [
        settings["binary"],
        "exec",
        "--containall",
        "--no-home",
        "--net",
        "--network",
        "none",
        "--bind",
        f"{settings['env_src']}:{ENV_MOUNT}:ro",
        "--bind",
        f"{settings['shim']}:{SHIM_MOUNT}:ro",
        "--env",
        f"PYTHONPATH={SHIM_MOUNT}",
        "--pwd",
        ENV_MOUNT,
        *json.loads(settings.get("extra_args", "[]")),
        settings["image"],
        *worker,
    ]


def _container(c: Any, slot: str, settings: dict[str, str]) -> Any:
    from docker.errors import NotFound

    try:
        ctr = c.containers.get(slot)
        if ctr.status != "running":
            ctr.start()
        return ctr
    except NotFound:
        return c.containers.run(
            settings["image"],
            ["python3", "-c", "import time\nwhile True: time.sleep(3600)"],
            name=slot,
            detach=True,
            network_mode="none",
            mem_limit=settings["mem_limit"],
            pids_limit=int(settings["pids_limit"]),
            volumes={
                settings["env_src"]: {"bind": ENV_MOUNT, "mode": "ro"},
                settings["shim"]: {"bind": SHIM_MOUNT, "mode": "ro"},
            },
            labels={"caravela.slot": slot},
        )


def relay(slot: str, settings: dict[str, str], argv: list[str]) -> int:
    """Run ``argv`` in the slot's container; pipe our stdin in, its stdout/stderr out."""
    c = client()
    ctr = _container(c, slot, settings)
    exec_id = c.api.exec_create(
        ctr.id,
        argv,
        stdin=True,
        stdout=True,
        stderr=True,
        environment={"PYTHONPATH": SHIM_MOUNT},
        workdir=ENV_MOUNT,
    )
    sock = c.api.exec_start(exec_id, socket=True)._sock

    def pump() -> None:
        while data := os.read(0, 1 << 16):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=pump, daemon=True).start()
    buf = b""
    while chunk := sock.recv(1 << 16):
        buf += chunk
        while len(buf) >= 8:  # frames: stream id (1 out, 2 err), 3 zero bytes, u32 size
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            os.write(1 if buf[0] == 1 else 2, buf[8 : 8 + size])
            buf = buf[8 + size :]
    return 0


def kill_slot(slot: str) -> None:
    """SIGKILL every process in the slot's container except PID 1 (the container stays)."""
    from docker.errors import NotFound

    try:
        client().containers.get(slot).exec_run(
            ["python3", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"]
        )
    except NotFound:
        pass


def remove_slots(slots: list[str]) -> None:
    """Delete the slots' containers."""
    from docker.errors import NotFound

    c = client()
    for slot in slots:
        try:
            c.containers.get(slot).remove(force=True)
        except NotFound:
            pass


PODMAN_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
"""
"""podman as root on these machines: runc (crun fails on hybrid cgroups) and ulimits the
host's hard limits allow (DESIGN.md)."""


def start_podman_service(workdir: Path, timeout_s: float = 30.0) -> tuple[Any, str]:
    """``podman system service`` on a socket in ``workdir`` (for machines without Docker,
    like CI); returns the process and the ``DOCKER_HOST`` value to use."""
    import subprocess
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "containers.conf").write_text(PODMAN_CONF)
    sock = workdir / "podman.sock"
    log = open(workdir / "podman-service.log", "wb")  # noqa: SIM115 - lives with the service
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env={**os.environ, "CONTAINERS_CONF": str(workdir / "containers.conf")},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + timeout_s
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ContainerEngineError(
                f"podman service did not start: {(workdir / 'podman-service.log').read_text()}"
            )
        time.sleep(0.1)
    return proc, f"unix://{sock}"


def import_python_image(image: str, workdir: Path) -> None:
    """An image holding this machine's python3.11, its stdlib and the libraries it links,
    imported from a rootfs tar (no registry needed). No-op when the image exists."""
    import subprocess

    if client().images.list(name=image):
        return
    root = workdir / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "tmp").mkdir()
    shutil.copy2("/usr/bin/python3.11", root / "usr/bin/python3.11")
    os.symlink("python3.11", root / "usr/bin/python3")
    libs = subprocess.run(["ldd", "/usr/bin/python3.11"], capture_output=True, text=True).stdout
    for lib in (w for w in libs.split() if w.startswith("/")):
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest, follow_symlinks=True)
    shutil.copytree(
        "/usr/lib/python3.11",
        root / "usr/lib/python3.11",
        ignore=shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter", "ensurepip"),
    )
    tar = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    subprocess.run(["podman", "import", str(tar), image], check=True, capture_output=True)
    shutil.rmtree(root)
    tar.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reward_envs.containers")
    p.add_argument("--slot", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("worker", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    return relay(args.slot, json.loads(args.settings), worker)


if __name__ == "__main__":
    sys.exit(main())
