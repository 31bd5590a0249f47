"""A real, local SLURM cluster on one machine, for tests and trying the launcher.

``python -m slurm.local_cluster start DIR [--nodes N]`` / ``stop DIR``. Needs root and
Debian's ``slurm-wlm`` + ``munge`` (installed with apt when missing). Runs without
systemd: ``munged`` as user munge, ``slurmctld``, and one ``slurmd -N nodeK`` per node,
each with its own port (Debian builds slurmd with MULTIPLE_SLURMD), all on 127.0.0.1.
Start it inside a loopback-only network namespace: job steps inherit it, so a Ray
cluster a job starts stays on loopback. Clients need ``SLURM_CONF=DIR/slurm.conf``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = """ClusterName=caravela-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
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


def start(workdir: Path, nodes: int = 2, cpus: int = 2, timeout_s: float = 60) -> dict[str, str]:
    """Start munged, slurmctld and ``nodes`` slurmds; returns the env clients need."""
    ensure_installed()
    workdir = Path(workdir).resolve()
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    lines = [
        f"NodeName=node{k} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
        f"RealMemory=4000 State=UNKNOWN"
        for k in range(nodes)
    ]
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
    munge_dir = Path("/run/munge")
    munge_dir.mkdir(exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
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


def stop(workdir: Path) -> None:
    """Cancel every job first (else slurmstepd leaks), then stop the daemons."""
    workdir = Path(workdir).resolve()
    env = {**os.environ, "SLURM_CONF": str(workdir / "slurm.conf")}
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
    time.sleep(1)
    for pidfile in workdir.glob("slurm*.pid"):
        try:
            os.kill(int(pidfile.read_text().split()[0]), 15)
        except (ProcessLookupError, ValueError):
            pass
    # a daemon that had not written its pid file yet
    subprocess.run(["pkill", "-f", str(workdir / "slurm.conf")], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.local_cluster")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("workdir", type=Path)
    p.add_argument("--nodes", type=int, default=2)
    args = p.parse_args(argv)
    if args.action == "start":
        env = start(args.workdir, args.nodes)
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
