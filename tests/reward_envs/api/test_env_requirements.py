"""Registrations over real HTTP: requirements, lock files and the files they include are read
with the builder's rules (``reward_envs.requirements``) before anything is registered or
built; a recording package index on 127.0.0.1 named in them gets no request. What the server's
``requirements`` settings allow builds from the allowed index and scores."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer, PackageIndex

InlineEnv = Callable[..., dict[str, Any]]
Start = Callable[..., "LiveServer"]
Index = Callable[..., "PackageIndex"]
SCORER = "import caravela_testdep\n\n\ndef score(prompt, completion, **fields):\n"
SCORER += "    return caravela_testdep.VALUE / 42\n"
EXAMPLES = [{"prompt": "p", "completion": "c", "expected_score": 1.0}]


def needs_dep(lock: str | None = None, **files: str) -> dict[str, Any]:
    """An inline venv env whose scorer imports ``caravela_testdep``."""
    manifest: dict[str, Any] = {
        "name": "needsdep",
        "version": "1",
        "entry_point": "scorer:score",
        "isolation": "venv",
        "examples": EXAMPLES,
    }
    if lock:
        manifest["lock"] = lock
    return {"manifest": manifest, "files": {"scorer.py": SCORER, **files}}


def refused(api: LiveServer, body: dict[str, Any], *fragments: str) -> None:
    r = api.client.post("/v1/envs", json=body)
    assert r.status_code == 422, r.text
    text = json.dumps(r.json()["detail"])
    for f in fragments:
        assert f in text, text
    assert api.client.get("/v1/envs").json()["count"] == 0
    assert not any(api.state_dir.glob("envs/*"))  # no inline copy left behind


@pytest.mark.parametrize(
    ("lock", "where", "why"),
    [
        (
            "--index-url {simple}\ncaravela-testdep==1.0\n",
            "requirements.lock:1",
            "allow_index_urls",
        ),
        ("caravela-testdep==1.0\t--extra-index-url={simple}\n", "requirements.lock:1", "allow_"),
        ("caravela-testdep==1.0 \\\n  -i{simple}\n", "requirements.lock:1", "allow_index_urls"),
        ("# pins\n--find-links {url}/files/\ncaravela-testdep\n", "requirements.lock:2", "allow_"),
        ("caravela-testdep @ {url}/files/caravela_testdep-1.0-py3-none-any.whl\n", ":1", "URL"),
        ("-r more.txt\n", "requirements.lock:1", "allow_includes"),
    ],
)
def test_inline_lock_options_are_422_and_the_index_is_never_asked(
    api: LiveServer, package_index: Index, testdep_wheel: Path, lock: str, where: str, why: str
) -> None:
    foreign = package_index(testdep_wheel)
    text = lock.format(simple=foreign.simple, url=foreign.url)
    refused(api, needs_dep("requirements.lock", **{"requirements.lock": text}), where, why)
    assert foreign.requests == []


def test_manifest_list_options_are_422(api: LiveServer, inline_env: InlineEnv) -> None:
    for requirement, why in [
        ("--index-url=http://127.0.0.1:9/simple", "allow_index_urls"),
        ("sympy --extra-index-url http://127.0.0.1:9/simple", "belong in the manifest"),
        ("git+https://example.org/x.git", "URL or VCS"),
        ("-r /etc/passwd", "an include of another file"),
    ]:
        refused(api, inline_env(requirements=[requirement]), "requirements[0]", why)


def test_included_file_of_a_path_env_is_read_too(
    start_server: Start, tmp_path: Path, package_index: Index, testdep_wheel: Path
) -> None:
    foreign = package_index(testdep_wheel)
    env = tmp_path / "needsdep"
    env.mkdir()
    body = needs_dep("requirements.lock")
    (env / "caravela-env.toml").write_text(
        'name = "needsdep"\nversion = "1"\nentry_point = "scorer:score"\n'
        'lock = "requirements.lock"\n\n[[examples]]\nprompt = "p"\ncompletion = "c"\n'
        "expected_score = 1.0\n"
    )
    (env / "scorer.py").write_text(body["files"]["scorer.py"])
    (env / "requirements.lock").write_text("caravela-testdep==1.0\n-r extra/more.txt\n")
    (env / "extra").mkdir()
    (env / "extra" / "more.txt").write_text(
        f"# more\n\n--trusted-host 127.0.0.1 -i {foreign.simple}\n"
    )
    api = start_server()
    refused(api, {"path": str(env)}, str(env), "requirements.lock:2", "allow_includes")
    api.stop()
    api = start_server(tmp_path / "state2", requirements={"allow_includes": True})
    refused(api, {"path": str(env)}, "extra/more.txt:3", "turns off TLS checks")
    assert foreign.requests == []


def test_what_the_operator_allows_builds_from_the_allowed_index(
    start_server: Start, package_index: Index, testdep_wheel: Path, uv_cache: Path
) -> None:
    """The server's index is the operator's ``index_url``; an include is allowed by setting."""
    index = package_index(testdep_wheel)
    api = start_server(requirements={"index_url": index.simple, "allow_includes": True})
    body = needs_dep(
        "requirements.lock",
        **{"requirements.lock": "-r deps/more.txt\n", "deps/more.txt": "caravela-testdep==1.0\n"},
    )
    api.register(body)
    rec = api.wait("needsdep", timeout=120)
    assert rec["status"] == "ready", rec
    assert "/simple/caravela-testdep/" in index.requests
    r = api.client.post(
        "/v1/envs/needsdep/score", json={"items": [{"prompt": "p", "completion": "c"}]}
    )
    assert r.status_code == 200 and r.json()["results"][0]["score"] == 1.0, r.text


def test_the_server_command_takes_the_operator_settings(
    tmp_path: Path, package_index: Index, testdep_wheel: Path, uv_cache: Path
) -> None:
    """``caravela-env-api --index-url --allow-includes`` (a real server process)."""
    index = package_index(testdep_wheel)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "reward_envs.api.server", "--state-dir", str(state)]
    cmd += ["--port", str(port), "--store", str(tmp_path / "store")]
    cmd += ["--index-url", index.simple, "--allow-includes"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (state / "api-token").exists() or not _up(port):
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        token = (state / "api-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=60) as c:
            lock = {"requirements.lock": "-r more.txt\n", "more.txt": "caravela-testdep==1.0\n"}
            r = c.post("/v1/envs", json=needs_dep("requirements.lock", **lock))
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 120
            while (rec := c.get("/v1/envs/needsdep").json())["status"] == "building":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert rec["status"] == "ready", rec
        assert "/simple/caravela-testdep/" in index.requests
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
