"""Run untrusted Python in a bubblewrap sandbox with hard limits; stdlib only.

One call of ``run`` (or ``run_judged``) is one fresh sandbox: ``bwrap`` (Debian's
``bubblewrap``) started as an unprivileged user, with its own user, pid, network, ipc, uts
and cgroup namespaces, no further user namespaces (``--disable-userns``), a new session (no
terminal to inject into), and ``--die-with-parent`` (the sandbox goes when the env worker
goes). What enforces what (the threat model: ``docs/envs.md``):

* **who**: as root, the env drops to uid/gid 65534 (nobody) with no supplementary groups
  before exec'ing bwrap, so bwrap runs unprivileged and maps that uid into its user
  namespace: inside, files owned by root are "other" (``/etc/shadow``, 0640, stays
  unreadable even where it is visible) and there are no capabilities in the host's
  namespace. Not root: bwrap runs as the caller, the same way.
* **files**: a read-only root of ``/usr`` (with the ``/bin``, ``/lib*`` symlinks or
  binds), ``/etc/ld.so.cache`` only from ``/etc``, the interpreter's prefix if outside
  ``/usr``, a fresh ``/proc``, bwrap's minimal ``/dev`` remounted read-only, and two
  private tmpfs of ``file_bytes`` each: ``/tmp`` (cwd; the solution is copied there) and
  ``/dev/shm``; then ``/`` remounted read-only. No ``/home``, ``/root``, ``/work``, env
  store, sockets or secrets: chosen over a read-only bind of ``/``, which would show the
  solution every world-readable file of the host.
* **network**: ``--unshare-net``: a loopback of its own where nothing listens.
* **system calls**: bwrap sets ``no_new_privs`` and loads ``seccomp.py``'s filter
  (``--seccomp``) for every process of the sandbox: ``ptrace``, ``process_vm_readv``,
  mounts, ``unshare``/``setns``, keyrings, ``bpf``, ``perf_event_open`` and more answer
  ``EPERM``.
* **other processes**: ``runner.py`` is the sandbox's pid 1 (``--as-pid-1``: no bwrap
  init, which would have neither limits nor filter, shares the namespace). In stdio mode
  it becomes the solution itself; in judge mode it holds the tests and the report pipe,
  and makes itself non-dumpable before it forks the solution's process, so
  ``/proc/1/mem``, ``/proc/1/fd`` and the like are closed to that one.
* **processes**: ``RLIMIT_NPROC`` set inside the sandbox. Since Linux 5.14 it counts the
  processes of a uid *in the user namespace*, so each sandbox has its own budget (a fork
  bomb in one cannot starve another) and, the uid not being root, it is enforced.
* **CPU, memory, file size, open files**: ``RLIMIT_CPU`` (SIGKILL: pid 1 ignores
  SIGXCPU; ``RunResult.cpu_s`` tells it from other kills), ``RLIMIT_AS``,
  ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core files; set by ``runner.py`` in the sandbox
  before any solution code runs, soft and hard. These are
  per process; where we are root with a memory cgroup controller (``cgroup.py``), the
  sandbox's init joins a memory cgroup of its own before the command starts (bwrap's
  ``--block-fd``), capping all its processes and tmpfs together
  (``Limits.group_memory_bytes``), and a CPU cgroup capping them at ``Limits.cpus``
  cores where the cpu controller is there. Elsewhere a run's memory is bounded by
  ``processes`` x ``memory_mb`` only, its cores by ``processes``.
* **wall time and output**: enforced here. The wall limit counts from the runner's
  report (a slow start on a loaded machine does not eat the solution's time; the start
  itself may take ``SETUP_TIMEOUT_S``). Past it, or past ``output_bytes`` on stdout or
  stderr, the sandbox's init (pid 1 of its namespace) and bwrap's process group (its own
  session) are SIGKILLed; the kernel kills everything else in the pid namespace.
* **nothing outlives a run**: the sandbox's init is the runner (pid 1), which the kernel
  lets exit only after every process of the pid namespace did; bwrap reaps it, or this
  process (the subreaper of its descendants) when bwrap was killed first. So ``run``
  returns with the sandbox gone, and leaves no zombie behind for a host init that may not
  reap (some containers).

Sandbox failures (bwrap missing, setup errors, no Python the sandbox user can run) raise
``SandboxError``: the runner proves the sandbox came up by writing to a pipe before the
solution runs, so no solution can fake one, and none can make one look like a pass.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__:
    from . import cgroup, runner, seccomp
else:  # loaded by the env worker as a top-level module
    import cgroup  # type: ignore[no-redef]
    import runner  # type: ignore[no-redef]
    import seccomp  # type: ignore[no-redef]

NOBODY = 65534
"""uid and gid the sandbox runs as when the env runs as root."""
SOLUTION = "/tmp/solution.py"
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
"""Tried after the env's own interpreter, which the sandbox user may be unable to reach
(e.g. a pyenv Python under ``/root``, mode 0700)."""
RUNNER_SOURCE = Path(__file__).with_name("runner.py").read_text()
COMPILE_RUNNER = (
    "import marshal, sys\n"
    "sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(), 'runner.py', 'exec')))"
)
"""Run once per interpreter, outside the sandbox: ``runner.py`` as that Python's bytecode,
so a run loads it (~0.1 ms) instead of compiling its source (~5 ms) each time."""
BOOT_RUNNER = (
    "import marshal, os, sys\n"
    "with os.fdopen(int(sys.argv.pop(1)), 'rb') as f:\n"
    "    code = marshal.loads(f.read())\n"
    "exec(code)"
)
"""The sandbox's ``-c``: the runner's bytecode from the fd in its first argument."""
READ_CHUNK = 1 << 16
KILL_GRACE_S = 5.0
PR_SET_CHILD_SUBREAPER = 36
SETUP_TIMEOUT_S = 5.0
"""Most seconds bwrap and the runner may take to start, before the wall limit runs."""
GROUP_SLACK = 64 << 20
CPU_KILL_SHARE = 0.9
"""A run SIGKILLed after this share of its CPU limit hit the limit (the CPU time that
rusage reports falls a little short of what the kernel's limit counted)."""
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the solution): an env error, never a score."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    cpu_s: float = 2.0
    """CPU seconds per process; ``RLIMIT_CPU`` counts whole seconds, so rounded up."""
    wall_s: float = 5.0
    memory_mb: int = 256
    processes: int = 64
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20
    """Largest file, and the size of ``/tmp``."""
    open_files: int = 64
    cpus: float = 1.0
    """Cores all the run's processes may use at once, where a CPU cgroup is available."""

    @property
    def group_memory_bytes(self) -> int:
        """The memory cgroup's limit: ``memory_mb`` for all processes together, plus the
        two tmpfs and room for bwrap's init and the interpreter."""
        return (self.memory_mb << 20) + 2 * self.file_bytes + GROUP_SLACK

    @property
    def cpu_rlimit(self) -> int:
        return max(1, math.ceil(self.cpu_s))

    def runner_args(self) -> list[str]:
        """The limits as ``runner.py`` takes them: CPU s, bytes of memory, processes,
        bytes per file, open files."""
        values = [self.cpu_rlimit, self.memory_mb << 20, self.processes, self.file_bytes]
        return [str(v) for v in (*values, self.open_files)]


@dataclass
class RunResult:
    """What one sandboxed run did."""

    returncode: int
    """bwrap's exit code: the solution's, or 128 + N when signal N killed it (SIGKILL too
    when the env killed the sandbox: see ``timed_out``, ``output_exceeded``)."""
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    seconds: float = 0.0
    memory_peak_bytes: int | None = None
    """Most memory the run held at once, where a memory cgroup measured it."""
    cpu_s: float | None = None
    """CPU seconds the run's processes took (those that were reaped: its pid 1 at least)."""
    cpu_throttled_s: float | None = None
    """Seconds the run waited for its CPU cgroup's quota, where there was one."""
    report: bytes = b""
    """Judge mode: the judge's messages (``runner.py``), from a pipe only it holds."""
    records: list[tuple[object, ...]] = field(default_factory=list)
    """Judge mode: the judge's records, decoded (``run_judged``)."""

    def problem(self, limits: Limits) -> str | None:
        """Why the run failed on its own terms (killed, crashed), or None if it exited 0."""
        if self.timed_out:
            return f"timed out (wall limit {limits.wall_s:g} s)"
        if self.output_exceeded:
            return f"output limit exceeded ({limits.output_bytes} bytes)"
        if self.returncode == 0:
            return None
        cpu_limit = f"CPU time limit exceeded ({limits.cpu_rlimit} s)"
        near_limit = (self.cpu_s or 0) >= CPU_KILL_SHARE * limits.cpu_rlimit
        if self.returncode == 128 + signal.SIGKILL and near_limit:
            return cpu_limit  # RLIMIT_CPU kills a sandbox's pid 1 with SIGKILL
        signals = {
            signal.SIGXCPU: cpu_limit,
            signal.SIGXFSZ: "file size limit exceeded",
            signal.SIGKILL: "killed (SIGKILL)",
            signal.SIGSEGV: "segmentation fault",
        }
        if self.returncode > 128:
            try:
                sig = signal.Signals(self.returncode - 128)
            except ValueError:
                return f"exit code {self.returncode}"
            return signals.get(sig, f"killed by {sig.name}")
        return f"exit code {self.returncode}: {last_line(self.stderr)}"


def last_line(data: bytes, limit: int = 160) -> str:
    """The last non-empty line of ``data``, shortened: usually the exception."""
    lines = [x for x in data.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1].strip()[:limit] if lines else ""


# -- the sandbox -------------------------------------------------------------------------------
def bwrap() -> str:
    """Path of the bwrap binary; SandboxError if it is not installed."""
    found = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if found is None:
        raise SandboxError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    return found


def sandbox_user() -> int | None:
    """The uid (and gid) bwrap runs as: nobody when we are root, else None (our own)."""
    return NOBODY if os.geteuid() == 0 else None


def root_fs(prefix: Path) -> list[str]:
    """bwrap arguments for the read-only file system the solution sees (``/tmp`` aside)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        path = Path(top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if not prefix.resolve().is_relative_to("/usr"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


def sandbox_argv(
    python: str,
    prefix: Path,
    limits: Limits,
    files: dict[str, int],
    info_fd: int,
    seccomp_fd: int,
    block_fd: int | None = None,
) -> list[str]:
    """The bwrap command line, up to the interpreter's flags; ``files`` maps sandbox paths
    to fds to copy from; bwrap writes the sandbox's init pid to ``info_fd``, loads the
    seccomp filter from ``seccomp_fd``, and waits for a byte on ``block_fd`` (if given)
    before it runs the command (as pid 1: ``--as-pid-1``, no bwrap init inside)."""
    args = [
        bwrap(),
        *("--info-fd", str(info_fd)),
        *(("--block-fd", str(block_fd)) if block_fd is not None else ()),
        *("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc"),
        *("--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--as-pid-1"),
        *("--die-with-parent", "--new-session", "--clearenv", "--seccomp", str(seccomp_fd)),
    ]
    for key, value in SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    args += root_fs(prefix)
    size = str(limits.file_bytes)
    args += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm"]
    args += ["--remount-ro", "/dev", "--size", size, "--tmpfs", "/tmp"]
    for dest, fd in files.items():
        args += ["--file", str(fd), dest]
    args += ["--remount-ro", "/", "--chdir", "/tmp", "--", python, "-I", "-S", "-B"]
    return args


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding ``data``, positioned at its start."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_info(info_fd: int, deadline: float) -> int | None:
    """Host pid of the sandbox's init (pid 1 of its namespace), from bwrap's ``--info-fd``;
    None if bwrap exits or the deadline passes first (then it failed: the caller finds
    out why)."""
    data = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([info_fd], [], [], deadline - time.monotonic())
        chunk = os.read(info_fd, 4096) if readable else b""
        if not chunk:
            break
        data += chunk
        try:
            info = json.loads(data)
        except ValueError:  # not all of it yet
            continue
        pid = info.get("child-pid") if isinstance(info, dict) else None
        return pid if isinstance(pid, int) else None
    return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _kill_init(proc: subprocess.Popen[bytes], init: int) -> None:
    """SIGKILL the sandbox's init, if ``init`` still is it (pids get reused: pid_max may
    be 32768). A pidfd pins the process; it is ours while its parent is bwrap or us."""
    try:
        pidfd = os.pidfd_open(init)
    except OSError:  # gone
        return
    try:
        if _parent(init) in (proc.pid, os.getpid()):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _kill(proc: subprocess.Popen[bytes], init: int | None) -> None:
    """SIGKILL the sandbox: its init (the pid namespace dies with it) and bwrap's group."""
    if init is not None:
        _kill_init(proc, init)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap is not reaped yet: the pgid is its
    except ProcessLookupError:
        pass
    proc.wait()


def _reap(init: int | None) -> None:
    """Wait for the sandbox's init, so that every process of the sandbox is gone.

    bwrap exits as soon as its init reports the command's exit status, without reaping
    the init, which then goes to the nearest subreaper: this process (``_subreaper``).
    The kernel lets the init exit only after every other process in its pid namespace
    did. Reaping it here also keeps zombies from piling up where the host's pid 1 does
    not reap (some containers).
    """
    if init is None:
        return
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(init, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not ours (no subreaper): the host's init reaps it
            return
        time.sleep(0.001)


_is_subreaper = False


def _subreaper() -> None:
    """Make this process the subreaper of its descendants (Linux ``prctl``), once."""
    global _is_subreaper
    if not _is_subreaper:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise SandboxError(f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}")
        _is_subreaper = True


class _Watch:
    """Reads one running sandbox's output and enforces the wall and output limits."""

    def __init__(self, proc: subprocess.Popen[bytes], report_fd: int, limits: Limits) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.report_fd = report_fd
        self.limits = limits
        self.out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        self.report = bytearray()
        self.timed_out = self.exceeded = False

    @property
    def started(self) -> bool:
        """The runner reported in: the sandbox is up, the solution's wall time runs."""
        return self.report.startswith(b"ready")

    def run(self, start: float) -> None:
        """Read until bwrap exits, or a limit is hit (then the caller kills it)."""
        deadline = start + SETUP_TIMEOUT_S
        open_fds = {*self.out, self.report_fd}
        while open_fds & set(self.out) and not self.exceeded:
            left = deadline - time.monotonic()
            readable, _, _ = select.select(list(open_fds), [], [], max(0.0, left))
            if not readable and left <= 0:
                self.timed_out = True
                return
            for fd in readable:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    open_fds.discard(fd)
                    continue
                was_started = self.started
                buffer = self.report if fd == self.report_fd else self.out[fd]
                buffer += chunk
                self.exceeded = self.exceeded or len(buffer) > self.limits.output_bytes
                if self.started and not was_started:  # now the solution's wall time runs
                    deadline = time.monotonic() + self.limits.wall_s
        if not self.exceeded:
            self._wait(deadline)

    def _wait(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
        os.set_blocking(self.report_fd, False)  # what the judge wrote after the last read
        try:
            while chunk := os.read(self.report_fd, READ_CHUNK):
                self.report += chunk
                if len(self.report) > self.limits.output_bytes:
                    self.exceeded = True
                    break
        except BlockingIOError:
            pass


def _start(argv: list[str], stdin_fd: int, pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """Start bwrap in a session of its own, as the sandbox user."""
    uid = sandbox_user()
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            cwd="/",
            env=SANDBOX_ENV,
            start_new_session=True,
            user=uid,
            group=uid,
            extra_groups=None if uid is None else [],
        )
    except OSError as e:
        raise SandboxError(f"cannot start bwrap: {e}") from e


def _confine(
    init: int | None, limits: Limits, block_fd: int
) -> tuple[cgroup.MemoryCgroup | None, cgroup.CpuCgroup | None]:
    """Put the sandbox's init (still blocked, before the command) in a memory and a CPU
    cgroup of its own where we can make them, then let it go on. Without an init (bwrap
    failed or is stuck) it stays blocked: the caller finds out why."""
    if init is None:
        return None, None
    where, cpu_where = cgroup.layout(), cgroup.cpu_layout()
    memory = cpu = None
    try:
        if where is not None:
            memory = cgroup.MemoryCgroup(where, limits.group_memory_bytes)
            memory.add(init)
        if cpu_where is not None:
            v2_memory = where is not None and where.limit == "memory.max"
            shared = memory.path if memory is not None and cpu_where.v2 and v2_memory else None
            cpu = cgroup.CpuCgroup(cpu_where, limits.cpus, shared)
            cpu.add(init)
        os.write(block_fd, b"x")
    except (ProcessLookupError, BrokenPipeError):  # bwrap's setup failed: the caller says why
        pass
    except OSError as e:
        for group in (cpu, memory):
            if group is not None:
                group.remove()
        raise SandboxError(f"cannot confine the sandbox in its cgroups: {e}") from e
    return memory, cpu


def _children_cpu() -> float:
    """CPU seconds of this process's reaped descendants (bwrap accumulates its own)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_seccomp_program: bytes | None = None


def seccomp_program() -> bytes:
    """The seccomp filter (built once); SandboxError on an architecture it does not know."""
    global _seccomp_program
    if _seccomp_program is None:
        try:
            _seccomp_program = seccomp.program()
        except ValueError as e:
            raise SandboxError(str(e)) from None
    return _seccomp_program


def execute(
    python: str,
    prefix: Path,
    limits: Limits,
    mode: str,
    files: dict[str, bytes],
    stdin: bytes,
    jobs: bytes | None = None,
) -> RunResult:
    """One sandbox: ``runner.py`` in ``mode`` (stdio | judge); SandboxError if it never
    came up.

    ``stdin`` and ``jobs`` (judge mode: the judge's jobs, read from an fd that the runner
    closes in the solution's process before it runs) are memory files. The wall limit
    counts from the runner's report, so a slow sandbox start (a loaded machine) does not
    eat the solution's time; the start itself may take ``SETUP_TIMEOUT_S``.
    """
    _subreaper()
    fds = {dest: _memfd(Path(dest).name, data) for dest, data in files.items()}
    report_r, report_w = os.pipe()
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    stdin_fd = _memfd("stdin", stdin)
    filter_fd = _memfd("seccomp", seccomp_program())
    jobs_fd = _memfd("jobs", jobs) if jobs is not None else None
    code_fd = _memfd("runner", runner_code(python))
    argv = sandbox_argv(python, prefix, limits, fds, info_w, filter_fd, block_r)
    argv += ["-c", BOOT_RUNNER, str(code_fd), mode, SOLUTION, str(jobs_fd or "-"), str(report_w)]
    argv += limits.runner_args()
    passed = (*fds.values(), report_w, info_w, block_r, filter_fd, code_fd)
    passed += (jobs_fd,) if jobs_fd is not None else ()
    start = time.monotonic()
    cpu_before = _children_cpu()
    try:
        proc = _start(argv, stdin_fd, passed)
    except BaseException:
        for fd in (report_r, info_r, block_w):
            os.close(fd)
        raise
    finally:
        for fd in (*passed, stdin_fd):
            os.close(fd)
    watch = _Watch(proc, report_r, limits)
    init = None
    memory = cpu = None
    try:
        init = _read_info(info_r, start + SETUP_TIMEOUT_S)
        memory, cpu = _confine(init, limits, block_w)
        watch.run(start)
    finally:
        if proc.poll() is None:  # a limit, or interrupted: leave nothing running
            _kill(proc, init)
        _reap(init)
        peak = memory.peak() if memory is not None else None
        throttled = cpu.throttled_s() if cpu is not None else None
        for group in (cpu, memory):
            if group is not None:
                group.remove()
        for fd in (report_r, info_r, block_w):
            os.close(fd)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    stdout, stderr = (bytes(b) for b in watch.out.values())
    if not watch.started:
        why = f"did not start within {SETUP_TIMEOUT_S:g} s" if watch.timed_out else "failed"
        detail = stderr.decode("utf-8", "replace").strip()[-500:] or f"exit {proc.returncode}"
        raise SandboxError(f"the sandbox {why} ({python}): {detail}")
    return RunResult(
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=watch.timed_out,
        output_exceeded=watch.exceeded,
        seconds=time.monotonic() - start,
        cpu_s=_children_cpu() - cpu_before,
        memory_peak_bytes=peak,
        cpu_throttled_s=throttled,
        report=bytes(watch.report[len(b"ready") :]),
    )


# -- choosing the interpreter ---------------------------------------------------------------
_python: tuple[str, Path] | None = None
_runner_code: dict[str, bytes] = {}


def runner_code(python: str) -> bytes:
    """``runner.py`` compiled by ``python`` (cached), as ``marshal`` bytes."""
    if python not in _runner_code:
        try:
            done = subprocess.run(
                [python, "-I", "-S", "-B", "-c", COMPILE_RUNNER],
                input=RUNNER_SOURCE.encode(),
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxError(f"the sandbox failed ({python}): cannot run it: {e}") from None
        if done.returncode != 0:
            why = last_line(done.stderr)
            raise SandboxError(f"the sandbox failed ({python}): cannot compile the runner: {why}")
        _runner_code[python] = done.stdout
    return _runner_code[python]


def candidates() -> list[tuple[str, Path]]:
    """Interpreters to try, with their prefixes: the env's own Python first."""
    own = getattr(sys, "_base_executable", None) or sys.executable
    found = [(os.path.realpath(own), Path(sys.base_prefix))]
    for path in SYSTEM_PYTHONS:
        if os.path.exists(path):
            real = os.path.realpath(path)
            found.append((real, Path(real).parents[1]))
    unique: dict[str, Path] = {}
    for python, prefix in found:
        unique.setdefault(python, prefix)
    return list(unique.items())


def interpreter() -> tuple[str, Path]:
    """The first candidate Python that starts in the sandbox (cached); else SandboxError."""
    global _python
    if _python is None:
        errors = []
        for python, prefix in candidates():
            try:
                probe = execute(python, prefix, Limits(), "stdio", {SOLUTION: b"print('ok')"}, b"")
            except SandboxError as e:
                errors.append(str(e))
                continue
            if probe.returncode == 0 and probe.stdout == b"ok\n":
                _python = (python, prefix)
                break
            errors.append(f"{python}: {probe.problem(Limits())}")
        else:
            raise SandboxError("no Python runs in the sandbox:\n" + "\n".join(errors))
    return _python


# -- what the env calls ---------------------------------------------------------------------
def run(solution: str, limits: Limits, stdin: str = "") -> RunResult:
    """Run ``solution`` as a script with ``stdin``; its stdout and stderr come back."""
    python, prefix = interpreter()
    return execute(python, prefix, limits, "stdio", {SOLUTION: solution.encode()}, stdin.encode())


def run_judged(solution: str, jobs: list[tuple[int, str, str]], limits: Limits) -> RunResult:
    """Run ``solution`` in the solver and ``jobs`` ((index, ``eval`` | ``exec``, source))
    in the judge (``runner.py``); ``records`` holds the judge's decoded records, in order:
    ``(index, "value", encoded)``, ``(index, "opaque", type)``, ``(index, "ok")``,
    ``(index, "fail", reason)`` or ``("setup", reason)``. A job missing from them never
    finished: the run died first."""
    python, prefix = interpreter()
    files = {SOLUTION: solution.encode()}
    result = execute(python, prefix, limits, "judge", files, b"", runner.encode(jobs))
    reader = runner.Reader(-1)
    reader.buf = result.report
    while True:
        try:
            message = reader.receive()
        except (ValueError, OSError):  # cut off by the output limit or a kill
            break
        if message is None:
            break
        record = runner.decode(message)
        if isinstance(record, tuple):
            result.records.append(record)
    return result
