"""The Ray cluster a run uses, always with token authentication on.

Two ways in:

- ``start_local``: the embedded default. A private single-node cluster whose
  token is generated per run into a 0600 file, with every port (GCS, raylet, workers,
  object manager, metrics, dashboard and its agents) on 127.0.0.1. By default it refuses
  to start unless the process sits in a loopback-only network namespace (``make run``
  puts it in one with ``unshare -n``); ``allow_network=True`` starts it anyway (a laptop:
  the browser reaches the dashboard at 127.0.0.1), still only on loopback, still behind
  the token.
- ``connect``: join a cluster that is already up (the SLURM launcher's), with
  the token file the launcher wrote.

Ray reads ``RAY_AUTH_MODE`` when it is imported; both functions set it, and
re-read Ray's config if Ray was imported before.

The terminal shows Caravela's own lines only. What actors print (transformers' "Loading
weights" bars, torch's c10d warnings, tracebacks) stays in Ray's session logs
(``log_to_driver=False``), and so does what Ray's C++ core writes to this process's
stderr while it starts. Both functions print once where those logs are. An actor's error
still reaches the user: ``ray.get`` raises it, and Ray reports dead workers to the driver
either way.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STARTUP_LOG = "driver-ray-start.err"
"""Name of the file (in the session's ``logs/``) holding what Ray wrote to the driver's
stderr while it started."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be started or joined as asked; the message says what to change."""


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but ``lo``."""
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


def write_token(path: Path) -> Path:
    """A fresh random token in a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def enable_token_auth(token_path: Path) -> None:
    """Make this process (and the Ray processes it starts) use token auth with this token."""
    if not Path(token_path).is_file():
        raise ClusterError(f"Ray token file {token_path} does not exist")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray._raylet

    # Ray caches its config at import; re-read it so RAY_AUTH_MODE applies in this process.
    ray._raylet.Config.initialize("")  # type: ignore[attr-defined]
    # ... and drop a token cached from an earlier cluster in this process.
    ray._raylet.AuthenticationTokenLoader.instance().reset_cache()  # type: ignore[attr-defined]


SOCKET_TAIL = len("/session_2026-12-01_23-04-27_446266_4194304/sockets/dash_MetricsHead")
"""The longest path Ray puts under its temp dir: the dashboard's MetricsHead socket in a
session named with a 7-digit pid."""


def _temp_dir(run_dir: Path) -> str:
    # Ray's unix sockets live under the temp dir and must fit in 107 bytes.
    candidate = run_dir / "ray"
    if len(str(candidate.resolve())) + SOCKET_TAIL <= 107:
        candidate.mkdir(parents=True, exist_ok=True)
        return str(candidate.resolve())
    return tempfile.mkdtemp(prefix="caravela-ray-")


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """This process's file descriptor 2, where C++ libraries write directly, goes to ``path``
    meanwhile; on an error what was written there is echoed to the real stderr first."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.write(Path(path).read_text(errors="replace"))
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


LOOPBACK_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for single-machine nodes: set to 0, Ray takes 127.0.0.1 as the node's
address (as it does on macOS and Windows) instead of rewriting 127.0.0.1 to the routable
address, and its C++ servers (GCS, raylet, core workers) then listen on 127.0.0.1 only,
as do its Python agents. Measured with Ray 2.60 in a namespace holding a routable
address (tests/orchestrator/test_dashboard_loopback.py)."""


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray processes started meanwhile take 127.0.0.1 as this node's address and bind there.

    Ray reads the switch into ``ray_constants`` when it is imported, so the cached value is
    set too; both are put back afterwards (the Ray processes already started keep it in
    their environment, and the driver then knows its node's address)."""
    import ray._private.ray_constants as ray_constants

    saved_env, saved = os.environ.get(LOOPBACK_NODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_NODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(LOOPBACK_NODE, None)
        else:
            os.environ[LOOPBACK_NODE] = saved_env


def _session_logs(context: Any) -> Path:
    return Path(context.address_info["session_dir"]) / "logs"


def start_local(
    run_dir: Path,
    num_cpus: int | None = None,
    resources: dict[str, float] | None = None,
    allow_network: bool = False,
    dashboard: bool = True,
    log: Callable[[str], Any] = print,
) -> Any:
    """Start a private local Ray cluster for this run; returns ``ray.init``'s context."""
    if not allow_network and not loopback_only():
        raise ClusterError(
            "refusing to start a local Ray cluster with network interfaces present. Run "
            "inside a loopback-only network namespace (`unshare -n sh -c 'ip link set lo up "
            "&& exec caravela run ...'`, as `make run` does), or set cluster.allow_network = "
            "true (every Ray port and the dashboard stay on 127.0.0.1, token auth stays on)"
        )
    run_dir = Path(run_dir)
    token = write_token(run_dir / "ray-auth-token")
    enable_token_auth(token)
    temp_dir = _temp_dir(run_dir)
    with _loopback_node():
        context = _init(
            Path(temp_dir) / STARTUP_LOG,
            log,
            "",
            num_cpus=num_cpus,
            resources=resources,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _temp_dir=temp_dir,
        )
    if dashboard and context.dashboard_url:
        log(
            f"Ray dashboard: http://{context.dashboard_url} (on this machine; it asks for "
            f"the token in {token.resolve()})"
        )
    return context


def connect(address: str, token_path: Path, log: Callable[[str], Any] = print) -> Any:
    """Join the running cluster at ``address`` with the launcher's token file."""
    enable_token_auth(token_path)
    import ray

    fd, startup = tempfile.mkstemp(prefix="caravela-ray-start-", suffix=".err")
    os.close(fd)
    try:
        return _init(Path(startup), log, " on each node", address=address)
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {e}") from e


def _init(startup: Path, log: Callable[[str], Any], where: str, **options: Any) -> Any:
    """``ray.init(**options)`` with actors' output kept in the session logs and Ray's start-up
    stderr in ``startup``, moved there too; says once where the logs are."""
    import ray

    with _stderr_to(startup):
        context = ray.init(logging_level=logging.WARNING, log_to_driver=False, **options)
    logs = _session_logs(context)
    if logs.is_dir():  # joined: the head's session dir may be on another machine
        shutil.move(startup, logs / STARTUP_LOG)
    log(f"Ray logs (what every actor prints: model loading, warnings, errors): {logs}{where}")
    return context
