"""Envs registered mid-run are built as the head node must build them, with no internet: into
the run's env store, offline from the run's wheelhouse (``--no-index --find-links``). One
whose requirement the wheelhouse lacks ends ``failed`` with the reason, in the API, the run's
log and its metrics, and the run goes on. A real ``caravela run`` (one process), real HTTP,
real uv builds from a wheelhouse of hand-made wheels."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from common.paths import ARITH_ENV, TINY_TRAIN

pytestmark = pytest.mark.slow


def make_wheel(where: Path, name: str = "caravela_testdep", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (``VALUE = 42``), written by hand: no index needed."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        ),
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: caravela-test\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    wheel = where / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def arith_needing(tmp_path: Path, name: str, requirement: str) -> Path:
    """The arith env under another name, importing ``caravela_testdep`` from its venv."""
    env_dir = Path(shutil.copytree(ARITH_ENV, tmp_path / name))
    manifest = env_dir / "caravela-env.toml"
    text = manifest.read_text().replace('name = "arith"', f'name = "{name}"')
    manifest.write_text(text.replace("requirements = []", f'requirements = ["{requirement}"]'))
    code = (env_dir / "env.py").read_text()
    (env_dir / "env.py").write_text(code + "\n\nimport caravela_testdep  # noqa: E402,F401\n")
    return env_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_live_envs_build_into_the_runs_store_from_its_wheelhouse_or_fail_saying_why(tmp_path):
    wheels, store, default = tmp_path / "wheels", tmp_path / "run-store", tmp_path / "default"
    wheels.mkdir()
    make_wheel(wheels)
    os.chmod(wheels, 0o555)  # a shared, read-only wheelhouse
    good = arith_needing(tmp_path, "sumdep", "caravela-testdep==1.0")
    bad = arith_needing(tmp_path, "lacksdep", "caravela-not-in-wheelhouse==9.9")
    dataset = tmp_path / "sumdep.jsonl"
    with open(TINY_TRAIN) as f:
        rows = [json.loads(next(f)) for _ in range(400)]
    rows = [r | {"id": f"sd-{i}"} for i, r in enumerate(rows)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out, port = tmp_path / "run", free_port()
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
steps = 40
output_dir = "{out}"
[cluster]
mode = "local"
[rollout]
prompts_per_step = 8
[eval]
num_prompts = 8
k = 2
[checkpoint]
every_steps = 0
[env_api]
enabled = true
port = {port}
workers = 1
[[envs]]
name = "arith"
path = "{ARITH_ENV}"
isolation = {{ type = "venv", store = "{store}", wheelhouse = "{wheels}" }}
"""
    )
    caravela = str(Path(sys.executable).parent / "caravela")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [caravela, "run", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CARAVELA_ENV_STORE": str(default)},  # must stay unused
    )
    try:
        metrics, prompts = out / "metrics.jsonl", out / "prompts.jsonl"
        wait_for(lambda: len(lines(metrics)) >= 2, 300, "2 steps", proc)
        token = (out / "env-api" / "api-token").read_text().strip()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        mixture = {"dataset": str(dataset), "weight": 1.0}
        for env_dir in (good, bad):
            body = {"path": str(env_dir), "isolation": "venv", "mixture": mixture}
            r = api.post("/v1/envs", json=body)
            assert r.status_code == 202, r.text

        def status(name: str) -> str:
            return api.get(f"/v1/envs/{name}").json()["status"]

        wait_for(lambda: status("lacksdep") != "building", 120, "lacksdep's build", proc)
        rec = api.get("/v1/envs/lacksdep").json()
        assert rec["status"] == "failed", rec
        assert "failing: caravela-not-in-wheelhouse==9.9" in rec["error"]
        assert f"offline from the wheelhouse {wheels} (no package index)" in rec["error"]
        assert f"pip download -d {wheels}" in rec["error"]  # what to do about it

        def sumdep_steps() -> list[int]:
            return [
                s["step"] for s in lines(prompts) if any(p.startswith("sd-") for p in s["prompts"])
            ]

        wait_for(lambda: len(sumdep_steps()) >= 3, 300, "sumdep prompts in 3 steps", proc)
        assert status("sumdep") == "ready"
        scored = [m for m in lines(metrics) if "reward_mean/sumdep" in m]
        assert scored and all(m["reward_errors"] == 0 for m in scored)  # its venv imports it
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    built = {p.name.rsplit("-", 1)[0]: p for p in store.iterdir() if (p / "build.json").exists()}
    assert set(built) == {"arith", "sumdep"}  # the run's store: its own env and the live one
    record = json.loads((built["sumdep"] / "build.json").read_text())
    assert record["offline"] and record["wheelhouse"] == str(wheels)
    assert not default.exists() or not any(default.glob("*-*"))  # nothing in the default store
    assert not any(store.glob("lacksdep-*"))  # nothing half-built

    every = lines(out / "metrics.jsonl")
    assert sum(m["live_envs_failed"] for m in every) == 1  # counted once, at the next step
    assert sum(m["live_envs_joined"] for m in every) == 1
    text = (tmp_path / "run.log").read_text()
    assert f"venvs built into {store}, from the wheelhouse {wheels}, no index" in text
    assert "env 'lacksdep' was not admitted (failed): env 'lacksdep': installing" in text
    assert "env 'sumdep' joined the mixture" in text
