"""``cluster.allow_network = true`` (a laptop, a login node: no private network namespace)
keeps every Ray port and the dashboard on 127.0.0.1, with token auth on.

The test makes a network namespace of its own holding a second interface with a private
address (10.123.0.1, default route through it, so Ray's own address probe picks it), starts
the local cluster there with ``allow_network=True``, runs a task and an actor (their worker
processes open ports too), then reads every listening TCP socket and unconnected UDP socket
of the namespace from /proc/net: each must be on loopback. No packet leaves the namespace:
its second interface leads nowhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~30 s: a Ray cluster with its dashboard

NAMESPACE = """
set -e
ip link set lo up
ip link add cara0 type dummy 2>/dev/null || ip link add cara0 type veth peer name cara1
ip link set cara1 up 2>/dev/null || true
ip addr add 10.123.0.1/24 dev cara0
ip link set cara0 up
ip route add default dev cara0
exec "$@"
"""

PROBE = r"""
import ipaddress, json, os, sys, urllib.error, urllib.request
from pathlib import Path

import ray
from ray._private.services import node_ip_address_from_perspective

from orchestrator.cluster import start_local

run_dir = Path(sys.argv[1])
routable = node_ip_address_from_perspective()  # what Ray would pick without the setting
context = start_local(run_dir, num_cpus=2, allow_network=True, log=lambda s: None)


@ray.remote
class Echo:
    def ping(self):
        return "pong"


@ray.remote
def square(x):
    return x * x


echo = Echo.remote()
assert ray.get(echo.ping.remote()) == "pong" and ray.get(square.remote(3)) == 9


def address(hex_ip):
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # little-endian 32-bit words
    return ipaddress.IPv6Address(b"".join(words))


def owners():
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found[link[8:-1]] = f"{name} (pid {pid})"
        except OSError:
            continue
    return found


sockets, who = [], owners()
for proto, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", None), ("udp6", None)):
    for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
        f = line.split()
        if state is not None and f[3] != state:
            continue
        ip_hex, port_hex = f[1].split(":")
        ip = address(ip_hex)
        mapped = getattr(ip, "ipv4_mapped", None)
        sockets.append({
            "proto": proto,
            "address": str(ip),
            "port": int(port_hex, 16),
            "peer": f[2],
            "connected": int(f[2].split(":")[1], 16) != 0,
            "loopback": ip.is_loopback or bool(mapped and mapped.is_loopback),
            "process": who.get(f[9], "?"),
        })

url = f"http://{context.dashboard_url}"
token = (run_dir / "ray-auth-token").read_text().strip()


def status(path, headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


print(json.dumps({
    "routable": routable,
    "node_ip": context.address_info["node_ip_address"],
    "gcs": context.address_info["gcs_address"],
    "dashboard": context.dashboard_url,
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
    "mode": status("/api/authentication_mode", {}),
    "anonymous": status("/api/version", {})[0],
    "wrong_token": status("/api/version", {"Authorization": "Bearer nope"})[0],
    "with_token": status("/api/version", {"Authorization": f"Bearer {token}"})[0],
    "sockets": sockets,
}))
ray.shutdown()
"""


def unshare() -> list[str]:
    """A new network namespace: as root directly, otherwise inside a user namespace."""
    return ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]


def test_allow_network_keeps_every_ray_port_and_the_dashboard_on_loopback(tmp_path: Path):
    probe = subprocess.run(
        [*unshare(), "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*unshare(), "sh", "-c", NAMESPACE, "ns", sys.executable, "-c", PROBE, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    # the namespace is a real test: Ray's own probe finds the private, routable address
    assert seen["routable"] == "10.123.0.1"
    listening = [s for s in seen["sockets"] if s["proto"].startswith("tcp")]
    assert len(listening) >= 8, listening  # GCS, raylet, workers, dashboard and its agents
    # a UDP socket connected to a peer (a name lookup in flight) receives from that peer only
    receiving = [s for s in seen["sockets"] if s["proto"].startswith("tcp") or not s["connected"]]
    exposed = [s for s in receiving if not s["loopback"]]
    assert not exposed, "bound beyond loopback:\n" + "\n".join(
        f"{s['proto']} {s['address']}:{s['port']} {s['process']}" for s in exposed
    )
    assert seen["node_ip"] == "127.0.0.1" and seen["nodes"] == ["127.0.0.1"]
    assert seen["gcs"].startswith("127.0.0.1:") and seen["dashboard"].startswith("127.0.0.1:")

    # the dashboard asks for the token: none or a wrong one is refused, the run's is let in
    assert seen["mode"][0] == 200 and json.loads(seen["mode"][1]) == {
        "authentication_mode": "token"
    }
    assert (seen["anonymous"], seen["wrong_token"], seen["with_token"]) == (401, 403, 200)
    assert (run_dir / "ray-auth-token").stat().st_mode & 0o077 == 0  # owner-only token file
