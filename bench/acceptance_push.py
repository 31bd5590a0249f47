"""The weight-push check of ``bench/gpu_acceptance.py``: two spawned processes, one GPU each
(or both on the CPU with gloo), joined by ``common.transfer.TransferGroup``.

Rank 0 loads the served weights of the saved model (``served_shapes``: a tied LM head left
out) in bfloat16 and ``send``s them bucket by bucket; rank 1 ``receive``s them. Both report
``weights_checksum`` of what they hold and the seconds of each push (the first one sets up
the communicator and is reported apart). Torch, safetensors and the project's torch-only
modules: the ranks start without transformers.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from common.transfer import TensorMeta, TransferGroup, named
from common.weights import weights_checksum
from inference_server.weights import served_shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def push(model_dir: Path, device: str, bucket_bytes: int, pushes: int, threads: int) -> dict:
    """Run both ranks (``device``: "cuda" or "cpu") and compare what they report; ``passed``
    when the checksums are equal. Raises if a rank fails or never reports."""
    ctx = torch.multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    spec = (free_port(), str(model_dir), device, bucket_bytes, pushes, threads, out)
    procs = [ctx.Process(target=push_rank, args=(r, *spec)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    try:
        for _ in procs:
            r = out.get(timeout=240)  # the ranks' own rendezvous gives up at 180 s
            got[r["rank"]] = r
    except queue.Empty:
        missing = sorted({0, 1} - set(got))
        raise TimeoutError(f"weight push: ranks {missing} never reported") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = {r: g["error"] for r, g in got.items() if "error" in g}
    if errors:
        raise RuntimeError(f"weight push failed: {errors}")
    send = got[0]["seconds"][1:]  # the first push sets up the communicator
    res = {
        "backend": "nccl" if device == "cuda" else "gloo",
        "bytes": got[0]["bytes"],
        "buckets": got[0]["buckets"],
        "bucket_bytes": bucket_bytes,
        "first_push_seconds": got[0]["seconds"][0],
        "push_seconds": send,
        "receive_seconds": got[1]["seconds"][1:],
        "gb_per_s": got[0]["bytes"] / min(send) / 1e9,
        "checksum_sender": got[0]["checksum"],
        "checksum_receiver": got[1]["checksum"],
    }
    res["passed"] = res["checksum_sender"] == res["checksum_receiver"]
    return res


def push_rank(
    rank: int,
    port: int,
    model_dir: str,
    device_type: str,
    bucket_bytes: int,
    pushes: int,
    threads: int,
    out: Any,
) -> None:
    """One end of the push (a spawned process): rank 0 sends, rank 1 receives; both put
    their checksum and seconds per push (or their error) on ``out``."""
    try:
        from safetensors.torch import load_file

        torch.set_num_threads(threads)
        device = "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        meta = [TensorMeta(n, "bfloat16", s) for n, s in served_shapes(Path(model_dir)).items()]
        group = TransferGroup("127.0.0.1", port, rank, 2, device, timeout_s=180)
        state: dict[str, torch.Tensor] = {}
        if rank == 0:
            for f in sorted(Path(model_dir).glob("*.safetensors")):
                state.update(load_file(f, device=device))
            state = {m.name: state[m.name].to(torch.bfloat16) for m in meta}
        seconds, sent = [], 0
        for _ in range(pushes):
            _sync(device)
            t0 = time.perf_counter()
            if rank == 0:
                sent = group.send(named(state, meta), meta, bucket_bytes)
            else:
                state = group.receive(meta, bucket_bytes)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        report = {"checksum": weights_checksum(state), "seconds": seconds, "buckets": sent}
        out.put({"rank": rank, "bytes": sum(m.nbytes for m in meta), **report})
        group.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the check
        out.put({"rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
