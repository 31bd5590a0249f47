"""Per-item overhead of the docker backend vs a venv, and worker start-up time.

Run as root on a machine with podman (or with DOCKER_HOST pointing at an engine):
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/container_overhead.py'``
(~1 min). Writes ``bench/results/container_overhead.json`` and ``.md``.

Same env (the built-in ``arith``), same 300 items, one worker: through a venv pool and
through a docker pool (podman's Docker-compatible service started here, image imported
from this machine's python3.11). Per-item ms = median of 3 timed ``score`` calls / 300.
Start-up = pool construction until every worker said hello (the docker one includes
creating the container); restart = one worker killed and back.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reward_envs.builder import prepare  # noqa: E402
from reward_envs.config import DockerIsolation, VenvIsolation  # noqa: E402
from reward_envs.containers import import_python_image, start_podman_service  # noqa: E402
from reward_envs.manifest import load_manifest  # noqa: E402
from reward_envs.pool import EnvPool  # noqa: E402

ARITH = REPO / "reward_envs" / "builtin" / "arith"
IMAGE = "caravela-test-python:3.11"
N = 300


def measure(built, manifest) -> dict[str, float]:
    t0 = time.perf_counter()
    pool = EnvPool(manifest, built, workers=1)
    start = time.perf_counter() - t0
    items = manifest.example_items()
    items = [items[i % len(items)] for i in range(N)]
    try:
        pool.score(items)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            pool.score(items)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool._restart(pool.workers[0])  # what a timeout or crash costs, before the retry
        pool.score(items[:1])
        restart = time.perf_counter() - t0
    finally:
        pool.close()
    return {
        "start_s": start,
        "per_item_ms": statistics.median(times) / N * 1e3,
        "restart_s": restart,
    }


def main() -> None:
    manifest = load_manifest(ARITH)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        service = None
        if "DOCKER_HOST" not in os.environ:
            service, os.environ["DOCKER_HOST"] = start_podman_service(Path(tmp) / "podman")
        try:
            import_python_image(IMAGE, Path(tmp))
            out = {
                "venv": measure(prepare(ARITH, VenvIsolation(store=store)), manifest),
                "docker": measure(prepare(ARITH, DockerIsolation(image=IMAGE), store), manifest),
            }
        finally:
            if service is not None:
                service.terminate()
    res = REPO / "bench" / "results"
    (res / "container_overhead.json").write_text(json.dumps(out, indent=2))
    v, d = out["venv"], out["docker"]
    lines = [
        "# docker backend vs venv (arith env, 1 worker, 300 items)",
        "",
        "| backend | per item ms | pool start s | worker restart s |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {m['per_item_ms']:.3f} | {m['start_s']:.2f} | {m['restart_s']:.2f} |"
            for k, m in out.items()
        ),
        "",
        f"docker / venv per item: {d['per_item_ms'] / v['per_item_ms']:.2f}x",
    ]
    (res / "container_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
