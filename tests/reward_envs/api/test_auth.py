"""Bearer-token auth: every route but ``/health`` needs the token the server wrote (0600) at
start; ``serve`` prints where it is and binds loopback."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

ROUTES = [
    ("GET", "/v1/envs"),
    ("POST", "/v1/envs"),
    ("GET", "/v1/envs/arith"),
    ("DELETE", "/v1/envs/arith"),
    ("POST", "/v1/envs/arith/score"),
    ("GET", "/v1/envs/arith/health"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Basic dXNlcjpwYXNz", "Bearer", b"Bearer \xff\xfe"],
    ids=["none", "wrong", "basic", "empty", "not-ascii"],
)
def test_routes_refuse_requests_without_the_token(
    api: LiveServer, authorization: str | bytes | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=api.url, headers=headers) as anonymous:
        for method, path in ROUTES:
            r = anonymous.request(method, path, json={"items": []})
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "api-token" in r.json()["detail"]
        assert anonymous.get("/health").status_code == 200


def test_the_right_token_gets_in(api: LiveServer) -> None:
    assert api.client.get("/v1/envs").status_code == 200
    assert api.client.get("/metrics").status_code == 200


def test_token_file_is_private_and_new_per_server(
    start_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    first = start_server(tmp_path / "state")
    token_file = tmp_path / "state" / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(first.token) == 64 and int(first.token, 16) >= 0
    first.stop()
    second = start_server(tmp_path / "state")
    assert second.token != first.token
    with httpx.Client(base_url=second.url, headers=first.auth) as stale:
        assert stale.get("/v1/envs").status_code == 401


def _listen_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a socket listening on ``port``."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    rows += [line.split() for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]]
    return [
        local.split(":")[0]
        for _, local, _, state, *_ in rows
        if int(local.split(":")[1], 16) == port and state == "0A"
    ]


def test_serve_prints_the_token_path_and_listens_on_loopback(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "reward_envs.api.server", "--state-dir", str(tmp_path / "st")]
    cmd += ["--store", str(tmp_path / "store"), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        token_file = tmp_path / "st" / "api-token"
        assert str(token_file) in line and f"127.0.0.1:{port}" in line
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.05)
        token = token_file.read_text().strip()  # written once the server started
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.get(f"http://127.0.0.1:{port}/v1/envs", headers=auth)
        assert r.status_code == 200 and r.json() == {"envs": [], "count": 0}
        assert _listen_addresses(port) == ["0100007F"]  # 127.0.0.1 only
    finally:
        proc.terminate()
        proc.wait(timeout=20)
