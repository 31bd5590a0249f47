"""The two weight paths, trainer rank -> engine, side by side on CPU.

Run inside a loopback-only namespace (Ray and gloo open ports):
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/weight_transport.py'``
(~6 min; ~10 GB of memory at 500M). Writes ``bench/results/weight_transport.json`` and
``.md``.

The run's own parts: one trainer rank (``TrainerGroup``) and one transformers engine
(``EngineRouter``) as Ray actors on two Ray nodes (``ray.cluster_utils.Cluster`` on this
machine: a trainer node and an inference node, each with its own object store, as on a
cluster), random fp32 Llamas of about 20M, 100M and 500M parameters. One push = what
``Parts.push`` does before its probe:

- ``object_store`` (``inference.weight_sync = "object_store"``): rank 0 exports a
  ``HostState`` into Ray's object store, the engine fetches it, checks it and loads it;
- ``collective`` (the default): rank 0 broadcasts buckets over the weight-push group
  (``common.transfer``, gloo), the engine receives, checks and loads them.

The two alternate push by push (3 timed after one warm-up each, median), so load on the
machine hits both alike. Between the two nodes the object store copies the state through
Ray's object manager, and gloo through TCP; both over loopback here, not a network.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generation import SHAPES, make_random  # noqa: E402

SIZES = {**SHAPES, "random-500M": (1536, 13, 12, 6144)}
REPS = 4  # the first of each path is a warm-up
BUCKET_MB = 32


def push_seconds(
    trainers: Any, engines: Any, names: list[str], meta: Any, path: str, v: int
) -> float:
    t0 = time.perf_counter()
    if path == "collective":
        sending = trainers.send_weights(meta, BUCKET_MB << 20)
        engines.receive_weights(v, meta, BUCKET_MB << 20)
        sending.result()
    else:
        engines.update_weights(v, trainers.host_state(names), 1 << 20)
    return time.perf_counter() - t0


def bench_size(model_dir: Path) -> dict[str, Any]:
    import ray

    from common.weights import weights_checksum
    from inference_server.actors import start_engines
    from inference_server.config import TransformersBackend
    from inference_server.router import EngineRouter
    from inference_server.weights import served_shapes
    from trainer.config import TrainerConfig
    from trainer.group import TrainerGroup

    trainers = TrainerGroup(model_dir, TrainerConfig(cpus_per_rank=1))
    handles = start_engines(TransformersBackend(cpus_per_engine=1), model_dir)
    engines = EngineRouter(handles)
    names = sorted(served_shapes(model_dir))
    address, port = trainers.transfer_address()
    opening = trainers.open_transfer(address, port, 1 + engines.transfer_size())
    engines.join_transfer(address, port, 1 + engines.transfer_size())
    opening.result()
    meta = trainers.transfer_meta(names)
    times: dict[str, list[float]] = {"object_store": [], "collective": []}
    version = 0
    for _ in range(REPS):
        for path in times:
            version += 1
            times[path].append(push_seconds(trainers, engines, names, meta, path, version))
    served = {ray.get(h.checksum.remote()) for h in handles.values()}
    trained = weights_checksum(trainers.state_dict(names))
    assert served == {trained}, "the engine does not serve the trainer's weights"
    for h in [*handles.values(), *trainers.ranks]:
        ray.kill(h)
    params = sum(m.nbytes for m in meta) // 4
    return {
        "params": params,
        "mb": sum(m.nbytes for m in meta) / 2**20,
        "seconds": {p: statistics.median(t[1:]) for p, t in times.items()},
        "all_seconds": times,
    }


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import enable_token_auth, write_token

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        enable_token_auth(write_token(Path(tmp) / "token"))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for role in ("trainer_node", "inference_node"):  # each with its own object store
            cluster.add_node(num_cpus=2, resources={role: 1}, object_store_memory=6 << 30)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning")
        for name, shape in SIZES.items():
            make_random(Path(tmp) / name, shape)
            results[name] = bench_size(Path(tmp) / name)
            s = results[name]["seconds"]
            print(name, results[name]["params"], s, flush=True)
        ray.shutdown()
        cluster.shutdown()
    res = REPO / "bench" / "results"
    (res / "weight_transport.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# weight push, trainer rank -> engine (Ray actors, CPU, fp32)",
        "",
        "One trainer rank and one transformers engine as Ray actors on two Ray nodes of one "
        "2-core machine (`ray.cluster_utils.Cluster`: each node has its own object store, "
        "as on a cluster); "
        f"collective buckets {BUCKET_MB} MiB. Median of 3 after a warm-up; the two paths "
        "alternate. Each push = export/send + engine receives, checks and loads.",
        "",
        "| model | params | MB | object store s | collective (gloo) s | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        s = r["seconds"]
        lines.append(
            f"| {name} | {r['params'] / 1e6:.0f}M | {r['mb']:.0f} | {s['object_store']:.3f} | "
            f"{s['collective']:.3f} | {s['object_store'] / s['collective']:.2f}x |"
        )
    (res / "weight_transport.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
