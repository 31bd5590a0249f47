"""Cgroups per sandbox run, memory and CPU, where this process may make them; stdlib only.

``RLIMIT_AS`` caps each process, so a fork bomb of allocators could still take
``processes`` x ``memory_mb``. A memory cgroup caps all the sandbox's processes (and its
tmpfs pages) together: the kernel's OOM killer then kills inside the sandbox only.
``RLIMIT_CPU`` caps each process's CPU seconds, but not how many cores a run's processes
use at once; a CPU cgroup (``cpu.max``, v1 ``cpu.cfs_quota_us``) caps that, at
``Limits.cpus`` cores.

Available when we are root and, for each controller, either its cgroup v1 hierarchy is
mounted (``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup/cpu``; our own cgroup there is
writable) or cgroup v2 delegates it to the children of our cgroup (its
``cgroup.subtree_control`` lists it). A controller found nowhere is skipped: ``layout()``
(memory) or ``cpu_layout()`` is None and the per-process limits stand alone.

Each run gets ``<our cgroup>/caravela-code-<pid>-<n>`` in each hierarchy (one directory
for both controllers under v2), removed when the run's processes are gone; directories
left by a worker that was killed mid-run are removed by the next worker that starts on
the same cgroup.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "caravela-code-"
V1_ROOT = Path("/sys/fs/cgroup/memory")
V1_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
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


@dataclass(frozen=True)
class CpuLayout:
    """Where this process makes its CPU cgroups: v1 (own hierarchy) or v2 (shared with
    memory, so the same directory when both are there)."""

    base: Path
    v2: bool


def _find_cpu() -> CpuLayout | None:
    if os.geteuid() != 0:
        return None
    v1 = _own_path("cpu")
    if v1 is not None and (V1_CPU_ROOT / v1 / "cpu.cfs_quota_us").exists():
        base = V1_CPU_ROOT / v1
        return CpuLayout(base, v2=False) if os.access(base, os.W_OK) else None
    v2 = _own_path("")
    if v2 is not None and (V2_ROOT / "cgroup.controllers").exists():
        base = V2_ROOT / v2
        control = base / "cgroup.subtree_control"
        if control.exists() and "cpu" in control.read_text().split():
            return CpuLayout(base, v2=True)
    return None


_layout: Layout | None = None
_looked = False
_cpu_layout: CpuLayout | None = None
_cpu_looked = False


def cpu_layout() -> CpuLayout | None:
    """Where to make the runs' CPU cgroups (cached), or None where we cannot."""
    global _cpu_layout, _cpu_looked
    if not _cpu_looked:
        try:
            _cpu_layout = _find_cpu()
        except (OSError, ValueError):
            _cpu_layout = None
        _cpu_looked = True
        if _cpu_layout is not None and not _cpu_layout.v2:
            _sweep(_cpu_layout.base)
    return _cpu_layout


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
        _rmdir(self.path)


def _rmdir(path: Path) -> None:
    """rmdir, retried briefly: the last processes may still be exiting."""
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


class CpuCgroup:
    """One run's CPU cap: its own v1 cgroup, or ``cpu.max`` in the run's v2 memory cgroup
    (``shared``) or in a v2 cgroup of its own."""

    def __init__(self, where: CpuLayout, cpus: float, shared: Path | None = None) -> None:
        quota = max(1000, round(cpus * CPU_PERIOD_US))
        self.own = shared is None
        self.path = shared or where.base / f"{PREFIX}{os.getpid()}-{next(_counter)}"
        if self.own:
            self.path.mkdir()
        if where.v2:
            (self.path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        if self.own:
            (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self) -> float | None:
        """Seconds the run's processes waited for their CPU quota (if the kernel says)."""
        try:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        except (OSError, ValueError):
            return None
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat["throttled_time"]) / 1e9 if "throttled_time" in stat else None

    def remove(self) -> None:
        if self.own:
            _rmdir(self.path)
