"""Live env registration: an env registered through the run's env API (real HTTP, bearer
token) joins the prompt mixture at the next step without a restart, and a deleted one drains:
its drawn prompts are still trained on, then no more are drawn, and the run goes on."""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.paths import ARITH_ENV, TINY_TRAIN

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("mode", [pytest.param("ray", marks=pytest.mark.long), "local"])
def test_env_registered_mid_run_joins_and_deleted_env_drains(tmp_path, mode):
    # a second env: the arith scorer under another name, with its own dataset
    env_dir = tmp_path / "sumcheck"
    shutil.copytree(ARITH_ENV, env_dir)
    manifest = env_dir / "caravela-env.toml"
    manifest.write_text(manifest.read_text().replace('name = "arith"', 'name = "sumcheck"'))
    dataset = tmp_path / "sumcheck.jsonl"
    with open(TINY_TRAIN) as f:
        rows = [json.loads(next(f)) for _ in range(400)]
    dataset.write_text(
        "".join(json.dumps({**r, "id": f"sc-{i}"}) + "\n" for i, r in enumerate(rows))
    )

    out, port = tmp_path / "run", free_port()
    sets = [
        f"cluster.mode={mode}",
        "steps=40",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        "checkpoint.every_steps=0",
        "env_api.enabled=true",
        f"env_api.port={port}",
        "env_api.workers=1",
        f"output_dir='{out}'",
    ]
    caravela = str(Path(sys.executable).parent / "caravela")
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [caravela, "run", *(x for s in sets for x in ("--set", s))],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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
        body = {
            "path": str(env_dir),
            "isolation": "process",
            "mixture": {"dataset": str(dataset), "weight": 1.0},
        }
        assert httpx.post(f"http://127.0.0.1:{port}/v1/envs", json=body).status_code == 401
        r = api.post("/v1/envs", json=body)
        assert r.status_code == 202, r.text
        registered_at = len(lines(metrics))

        def sumcheck_steps() -> list[int]:
            return [
                s["step"] for s in lines(prompts) if any(p.startswith("sc-") for p in s["prompts"])
            ]

        wait_for(lambda: len(sumcheck_steps()) >= 3, 300, "sumcheck prompts in 3 steps", proc)
        assert api.get("/v1/envs/sumcheck").json()["mixture"]["dataset"] == str(dataset)
        joined = [m for m in lines(metrics) if m.get("live_envs_joined")]
        assert len(joined) == 1 and joined[0]["step"] >= registered_at - 1  # joined mid-run
        scored = [m for m in lines(metrics) if "reward_mean/sumcheck" in m]
        assert scored and all(m["reward_errors"] == 0 for m in scored)  # really scored

        assert api.delete("/v1/envs/sumcheck").status_code == 200
        deleted_at = len(lines(metrics))
        wait_for(lambda: any(m.get("live_envs_left") for m in lines(metrics)), 300, "drain", proc)
        left = next(m["step"] for m in lines(metrics) if m.get("live_envs_left"))
        assert left >= deleted_at - 1
        wait_for(lambda: len(lines(metrics)) >= left + 4, 300, "3 steps after the drain", proc)
        after = [s for s in lines(prompts) if s["step"] > left]
        assert after and not any(p.startswith("sc-") for s in after for p in s["prompts"])
        assert all(m["live_envs"] == 0 for m in lines(metrics) if m["step"] >= left)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert "env 'sumcheck' joined the mixture" in text and "left the mixture" in text
    steps = lines(prompts)
    assert [s["step"] for s in steps] == list(range(40))
    used = [p for s in steps for p in s["prompts"]]
    assert len(used) == len(set(used))  # nothing drawn twice across join and drain
