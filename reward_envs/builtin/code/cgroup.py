"""A memory cgroup per sandbox run, where this process may make one; stdlib only.

``RLIMIT_AS`` caps each process, so a fork bomb of allocators could still take
``processes`` x ``memory_mb``. A memory cgroup caps all the sandbox's processes (and its
tmpfs pages) together: the kernel's OOM killer then kills inside the sandbox only.

Available when we are root and either the cgroup v1 memory controller is mounted
(``/sys/fs/cgroup/memory``, our own cgroup there is writable) or cgroup v2 delegates the
memory controller to the children of our cgroup (its ``cgroup.subtree_control`` lists
``memory``). Elsewhere ``layout()`` is None and the per-process limits stand alone.

Each run gets ``<our cgroup>/caravela-code-<pid>-<n>``, removed when the run's processes
are gone; directories left by a worker that was killed mid-run are removed by the next
worker that starts on the same cgroup.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "caravela-code-"
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


@dataclass(frozen=True)
class Layout:
    """Where this process makes its cgroups, and the file names of that cgroup version."""

    base: Path
    limit: str
    swap_limit: str
    peak: str


def _own_path(controller: str) -> str | None:
    """Our cgroup's path for ``controller`` (``""`` for the v2 hierarchy)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path.lstrip("/")
    return None


def _find() -> Layout | None:
    if os.geteuid() != 0:
        return None
    v1 = _own_path("memory")
    if v1 is not None and (V1_ROOT / v1 / "memory.limit_in_bytes").exists():
        layout = Layout(
            V1_ROOT / v1, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
            "memory.max_usage_in_bytes",
        )  # fmt: skip
        return layout if os.access(layout.base, os.W_OK) else None
    v2 = _own_path("")
    if v2 is not None and (V2_ROOT / "cgroup.controllers").exists():
        base = V2_ROOT / v2
        control = base / "cgroup.subtree_control"
        if control.exists() and "memory" in control.read_text().split():
            return Layout(base, "memory.max", "memory.swap.max", "memory.peak")
    return None


_layout: Layout | None = None
_looked = False


def layout() -> Layout | None:
    """Where to make the runs' cgroups (cached), or None where we cannot."""
    global _layout, _looked
    if not _looked:
        try:
            _layout = _find()
        except (OSError, ValueError):
            _layout = None
        _looked = True
        if _layout is not None:
            _sweep(_layout.base)
    return _layout


def _sweep(base: Path) -> None:
    """Remove the run cgroups of workers that died mid-run."""
    for stale in base.glob(f"{PREFIX}*"):
        pid = stale.name.removeprefix(PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                stale.rmdir()
            except OSError:
                pass


class MemoryCgroup:
    """One run's cgroup: made with its limit, joined by the sandbox's init, removed."""

    def __init__(self, where: Layout, limit_bytes: int) -> None:
        self.layout = where
        self.path = where.base / f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        (self.path / where.limit).write_text(str(limit_bytes))
        swap = self.path / where.swap_limit
        if swap.exists():  # no swapping past the limit either
            swap.write_text("0" if where.limit == "memory.max" else str(limit_bytes))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak(self) -> int | None:
        """Most memory the run's processes held at once, in bytes (if the kernel says)."""
        try:
            return int((self.path / self.layout.peak).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """rmdir, retried briefly: the last processes may still be exiting."""
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
