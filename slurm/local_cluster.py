"""A real, local SLURM cluster on one machine, for tests and trying the launcher.

``python -m slurm.local_cluster start DIR [--nodes N] [--cpus C] [--gpus G]`` / ``stop
DIR``. Needs root and Debian's ``slurm-wlm`` + ``munge`` (installed with apt when missing).
Runs without systemd: a private ``munged`` (its own key and socket under ``DIR/munge``),
``slurmctld``, and one ``slurmd -N nodeK`` per node, each with its own port (Debian builds
slurmd with MULTIPLE_SLURMD), all on 127.0.0.1. Clients need ``SLURM_CONF=DIR/slurm.conf``.

Steps are bound as on a real cluster: ``TaskPlugin=task/affinity`` pins each task to the
CPUs its step was given (a ``-c 1`` step to one CPU), and each node can have ``G`` fake
GPUs, typed GRES ``gpu:fake:G`` whose device files are links to ``/dev/null`` (slurmd wants
character devices), so SLURM sets ``CUDA_VISIBLE_DEVICES`` per step as it would for real
GPUs. (``task/cgroup`` also works on this machine's cgroup v1 mount, but its cgroups are
named by node and job id only, ``slurm_node0/uid_0/job_1``, so two local clusters at once,
e.g. two test runs, would share them.)

Start it inside a loopback-only network namespace: job steps inherit it, so a Ray cluster
a job starts stays on loopback. SLURM resolves names with ``AI_ADDRCONFIG``, which finds
nothing where the only addresses are loopback ones, so ``start`` then adds a private
address (10.213.0.1/32) to ``lo``: still no interface but ``lo`` and no route out.

DIR must be short (munged's and Ray's unix sockets live under it) and reachable by every
user (munged checks the socket directory's parents). ``stop`` cancels the jobs, shuts the
daemons down and then kills whatever is left (``proctrack/linuxproc`` follows parent links
and loses processes whose parent died first): every process of the cluster and its jobs
carries ``SLURM_CONF=DIR/slurm.conf`` in its environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# A requeued job may start again cred_expire + 1 s after the requeue (SLURM's default: 120 s).
# KillWait: SIGTERM -> SIGKILL delay when a job ends (default 30 s). sched_interval: pending
# jobs (a requeued one once its begin time has passed) are looked at every 60 s by default.
CONF = """ClusterName=caravela-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
GresTypes=gpu
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
MinJobAge=600
{nodes}
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

# A private address for SLURM's name resolution in a loopback-only namespace (see above).
PRIVATE_ADDRESS = "10.213.0.1/32"


def ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_only() -> bool:
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


def _add_private_address(workdir: Path) -> None:
    if not _loopback_only():
        return
    out = subprocess.run(
        ["ip", "addr", "add", PRIVATE_ADDRESS, "dev", "lo"], capture_output=True, text=True
    )
    if out.returncode == 0:
        (workdir / "added-address").write_text(PRIVATE_ADDRESS)
    elif "exists" not in out.stderr:
        raise RuntimeError(f"ip addr add {PRIVATE_ADDRESS} dev lo: {out.stderr.strip()}")


def _start_munged(workdir: Path) -> None:
    d = workdir / "munge"
    d.mkdir(mode=0o755, exist_ok=True)
    key = d / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
    out = subprocess.run(
        [
            "munged",
            f"--socket={d / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"munged did not start: {out.stderr.strip()} (the local cluster's directory must "
            "be short and every directory above it searchable by all users)"
        )


def _fake_gpus(workdir: Path, nodes: int, gpus: int) -> None:
    """``gres.conf``: ``gpus`` fake GPUs per node, device files linked to ``/dev/null``."""
    lines = []
    for k in range(nodes):
        devices = workdir / "gpus" / f"node{k}"
        devices.mkdir(parents=True, exist_ok=True)
        for g in range(gpus):
            link = devices / f"nvidia{g}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        lines.append(f"NodeName=node{k} Name=gpu Type=fake File={devices}/nvidia[0-{gpus - 1}]")
    (workdir / "gres.conf").write_text("\n".join(lines) + "\n")


def start(
    workdir: Path, nodes: int = 2, cpus: int = 2, gpus: int = 0, timeout_s: float = 60
) -> dict[str, str]:
    """Start munged, slurmctld and ``nodes`` slurmds of ``cpus`` CPUs and ``gpus`` fake
    GPUs each; returns the env clients need."""
    ensure_installed()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    (workdir / "state").mkdir(exist_ok=True)
    for k in range(nodes):
        (workdir / f"spool-node{k}").mkdir(exist_ok=True)
    gres = f" Gres=gpu:fake:{gpus}" if gpus else ""
    lines = [
        f"NodeName=node{k} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
        f"RealMemory=4000{gres} State=UNKNOWN"
        for k in range(nodes)
    ]
    if gpus:
        _fake_gpus(workdir, nodes, gpus)
    conf = workdir / "slurm.conf"
    conf.write_text(
        CONF.format(
            host=socket.gethostname(),
            ctld_port=_free_port(),
            dir=workdir,
            nodes="\n".join(lines),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _add_private_address(workdir)
    _start_munged(workdir)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    for k in range(nodes):
        subprocess.run(["slurmd", "-f", str(conf), "-N", f"node{k}"], check=True, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env
        ).stdout.split()
        if out[:1] == ["idle"] and int(out[1]) == nodes:
            return {"SLURM_CONF": str(conf)}
        if time.monotonic() > deadline:
            log = (workdir / "slurmctld.log").read_text()[-2000:]
            raise RuntimeError(f"local SLURM did not come up ({out}); slurmctld log:\n{log}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def cluster_processes(workdir: Path) -> list[int]:
    """Live processes of this cluster: its daemons (the conf path on their command line) and
    everything its jobs started (``SLURM_CONF`` pointing at it in their environment)."""
    conf = str(Path(workdir).resolve() / "slurm.conf").encode()
    mine = _ancestors()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"SLURM_CONF=" + conf in environ or conf in cmdline.split(b"\0"):
            if _alive(int(proc.name)):
                found.append(int(proc.name))
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stop(workdir: Path) -> None:
    """Cancel every job, stop the daemons, then kill whatever the jobs left behind."""
    workdir = Path(workdir).resolve()
    env = {**os.environ, "SLURM_CONF": str(workdir / "slurm.conf")}

    def slurm(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout if out.returncode == 0 else ""

    # Jobs first (else slurmstepd leaks): SIGTERM, SIGKILL after KillWait, then COMPLETING ends.
    slurm("scancel", "--user=root")
    deadline = time.monotonic() + 20
    while slurm("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    slurm("scontrol", "shutdown")
    daemons = []
    for pidfile in workdir.glob("slurm*.pid"):
        try:
            daemons.append(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    _kill(_wait_gone(daemons, 10), signal.SIGKILL)
    # Processes the jobs left (Ray daemons whose parent died first), and daemons that had not
    # written their pid file yet.
    left = cluster_processes(workdir)
    _kill(left, signal.SIGTERM)
    _kill(_wait_gone(left, 5), signal.SIGKILL)
    _wait_gone(left, 5)
    try:
        munged = int((workdir / "munge" / "munged.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        munged = 0
    if munged and _alive(munged):
        _kill([munged], signal.SIGTERM)
        _kill(_wait_gone([munged], 5), signal.SIGKILL)
    added = workdir / "added-address"
    if added.exists():
        subprocess.run(["ip", "addr", "del", added.read_text(), "dev", "lo"], capture_output=True)
        added.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.local_cluster")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("workdir", type=Path)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs per node")
    p.add_argument("--gpus", type=int, default=0, help="fake GPUs per node (GRES gpu:fake)")
    args = p.parse_args(argv)
    if args.action == "start":
        env = start(args.workdir, args.nodes, args.cpus, args.gpus)
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
