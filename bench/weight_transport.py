"""How new weights should travel from the trainer process to an engine process on CPU.

Run inside a loopback-only namespace (Ray and gloo open ports):
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/weight_transport.py'``
(~2 min). Writes ``bench/results/weight_transport.json`` and ``.md``.

Same state dicts as bench/generation.py (tiny 1M, random 20M and 100M Llama, fp32).
Each transport delivers the whole state dict from this process to another process,
which touches every tensor (sums it) before replying; median of 3 after a warm-up:

- ``ray``: ``ray.put`` once, a Ray actor receives the object ref; torch tensors are
  pickled, numpy arrays are read zero-copy from the object store (what the router sends);
- ``gloo``: ``torch.distributed.broadcast`` of every tensor from rank 0 to rank 1;
- ``shm``: ``safetensors`` file in /dev/shm written here, read by the other process.

The vLLM-side staging (safetensors buckets + ``reload_weights``) is the same after
any of them; bench/generation.py measures it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from generation import SHAPES, make_random  # noqa: E402

from common.paths import TINY_MODEL  # noqa: E402

REPS = 4  # first is warm-up


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def touch(state: dict[str, torch.Tensor]) -> float:
    return float(sum(t.sum() for t in state.values()))


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, object]:
    return {k: v.numpy() for k, v in state.items()}


class Sink:
    def take(self, state: dict[str, torch.Tensor]) -> float:
        return touch(state)

    def take_numpy(self, state: dict) -> float:
        return touch({k: torch.from_numpy(v) for k, v in state.items()})

    def read(self, path: str) -> float:
        from safetensors.torch import load_file

        return touch(load_file(path))


def bench_ray(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    import ray

    from orchestrator.cluster import start_local

    start_local(Path(tempfile.mkdtemp()), num_cpus=2, dashboard=False)
    sink = ray.remote(Sink).remote()
    out: dict[str, dict[str, float]] = {"ray": {}, "ray_numpy": {}, "shm": {}}
    for name, state in states.items():
        times = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            ray.get(sink.take.remote(ray.put(state)))
            times.append(time.perf_counter() - t0)
        out["ray"][name] = statistics.median(times[1:])
        times = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            ray.get(sink.take_numpy.remote(ray.put(to_numpy(state))))
            times.append(time.perf_counter() - t0)
        out["ray_numpy"][name] = statistics.median(times[1:])
        times = []
        for _ in range(REPS):
            from safetensors.torch import save_file

            path = f"/dev/shm/caravela-bench-{os.getpid()}.safetensors"
            t0 = time.perf_counter()
            save_file(state, path)
            ray.get(sink.read.remote(path))
            times.append(time.perf_counter() - t0)
            os.unlink(path)
        out["shm"][name] = statistics.median(times[1:])
    ray.shutdown()
    return out


def _gloo_rank(rank: int, paths: dict[str, str], port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for name, path in paths.items():
        state = load_state(Path(path))
        if rank == 1:
            state = {k: torch.empty_like(v) for k, v in state.items()}
        times = []
        for _ in range(REPS):
            dist.barrier()
            t0 = time.perf_counter()
            for t in state.values():
                dist.broadcast(t, src=0)
            if rank == 1:
                touch(state)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times[1:])
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def bench_gloo(paths: dict[str, str]) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, paths, 29533, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tiny-1M": str(TINY_MODEL)}
        for name, shape in SHAPES.items():
            make_random(Path(tmp) / name, shape)
            paths[name] = str(Path(tmp) / name)
        states = {n: load_state(Path(p)) for n, p in paths.items()}
        mb = {
            n: sum(t.numel() * t.element_size() for t in s.values()) / 2**20
            for n, s in states.items()
        }
        results = bench_ray(states)
        results["gloo"] = bench_gloo(paths)
    out = {"weights_mb": mb, "seconds": results}
    res = REPO / "bench" / "results"
    (res / "weight_transport.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# weight transport, trainer process -> engine process (CPU, fp32)",
        "",
        "Median of 3 after a warm-up; the receiver touches every tensor.",
        "",
        "| model | MB | ray, torch tensors s | ray, numpy arrays s | gloo broadcast s "
        "| /dev/shm safetensors s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in states:
        lines.append(
            f"| {name} | {mb[name]:.1f} | {results['ray'][name]:.4f} | "
            f"{results['ray_numpy'][name]:.4f} | "
            f"{results['gloo'][name]:.4f} | {results['shm'][name]:.4f} |"
        )
    (res / "weight_transport.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
