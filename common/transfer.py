"""The collective weight push: trainer rank 0 broadcasts buckets to every engine worker.

One ``torch.distributed`` process group of its own (not the trainer's default group):
rank 0 is the trainer's rank 0, which also hosts the rendezvous store; ranks 1.. are the
engine workers (a vLLM engine's tensor-parallel workers each take a rank, a transformers
engine one). ``gloo`` when the tensors live on the CPU, ``nccl`` on CUDA: the same code.

What is sent is described up front by ``TensorMeta`` (name, dtype, shape), so both sides
cut the stream into the same buckets (``buckets``): each bucket is one flat byte buffer,
packed by the sender tensor by tensor (a tensor never split, never the whole model at
once) and broadcast; receivers slice it back into tensors. Up to two buckets are in flight
at once, so packing the next overlaps sending the last. Torch only: the trainer and both
engine backends import it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

STORE_PREFIX = "caravela-weights"
IN_FLIGHT = 2
"""Buckets broadcast at once (packing the next overlaps sending the last)."""


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a push, as the receivers must allocate it."""

    name: str
    dtype: str
    """torch dtype name without the ``torch.`` prefix (``"bfloat16"``)."""
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> TensorMeta:
        return cls(name, str(dtype or t.dtype).removeprefix("torch."), tuple(t.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {self.name}: {self.dtype!r} is not a torch dtype")
        return dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


def buckets(meta: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices into ``meta`` of each bucket, in order: about ``bucket_bytes`` each, a tensor
    never split (one larger than ``bucket_bytes`` travels alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, m in enumerate(meta):
        current.append(i)
        size += m.nbytes
        if size >= bucket_bytes:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class TransferGroup:
    """This process's membership of the weight-push group (rank 0 sends, the rest receive)."""

    def __init__(
        self,
        address: str,
        port: int,
        rank: int,
        world: int,
        device: str = "cpu",
        timeout_s: float = 120.0,
    ) -> None:
        import torch.distributed as dist

        if world < 2:
            raise ValueError(f"a weight-push group needs a sender and a receiver, not {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a weight-push group of {world}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore(STORE_PREFIX, store)
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self._store = store  # keep the rendezvous server alive on rank 0
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.group: Any
        if backend_for(device) == "nccl":  # never run here: no GPU (README, "GPU paths")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world, options)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, world, timeout)

    def _broadcast(self, buffer: torch.Tensor) -> torch.distributed.Work:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.group.broadcast([buffer], opts)

    def send(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        meta: Sequence[TensorMeta],
        bucket_bytes: int,
    ) -> int:
        """Broadcast ``tensors`` (in ``meta``'s order, cast to its dtypes) bucket by bucket;
        returns the buckets sent. ``tensors`` is consumed lazily: one bucket is packed at a
        time, so a sharded trainer can gather tensor by tensor."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 of a weight-push group sends")
        it = iter(tensors)
        inflight: list[torch.distributed.Work] = []
        plan = buckets(meta, bucket_bytes)
        for k, idx in enumerate(plan):
            if len(inflight) == IN_FLIGHT:  # the buffer about to be reused has been sent
                inflight.pop(0).wait()
            flat = self._buffer(("send", k % IN_FLIGHT), sum(meta[i].nbytes for i in idx))
            offset = 0
            for i in idx:
                name, t = next(it)
                m = meta[i]
                if name != m.name or tuple(t.shape) != m.shape:
                    raise ValueError(
                        f"weight push out of step: got {name} {tuple(t.shape)} where "
                        f"{m.name} {m.shape} was announced"
                    )
                view = t.detach().to(self.device, m.torch_dtype).contiguous().view(-1)
                flat[offset : offset + m.nbytes].copy_(view.view(torch.uint8))
                offset += m.nbytes
            inflight.append(self._broadcast(flat))
        for work in inflight:
            work.wait()
        extra = next(it, None)
        if extra is not None:
            raise ValueError(f"weight push out of step: {extra[0]} was not announced")
        return len(plan)

    def _buffer(self, key: tuple[str, int], nbytes: int) -> torch.Tensor:
        """A byte buffer of ``nbytes`` kept for the next push under ``key``, on the CPU:
        fresh host memory costs a page fault per page on every push (measured: the 100M
        model's push took 1.4 s with fresh buffers); CUDA's caching allocator already reuses
        device memory, and there every buffer is released after the push."""
        if self.device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    def receive(self, meta: Sequence[TensorMeta], bucket_bytes: int) -> dict[str, torch.Tensor]:
        """Every tensor ``meta`` announces, as rank 0 sends them: views into this group's
        receive buffers, valid until the next ``receive`` (load them before that)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 of a weight-push group sends, it does not receive")
        plan = buckets(meta, bucket_bytes)
        out: dict[str, torch.Tensor] = {}
        inflight: list[tuple[torch.distributed.Work, list[int], torch.Tensor]] = []

        def unpack(idx: list[int], flat: torch.Tensor) -> None:
            offset = 0
            for i in idx:
                m = meta[i]
                out[m.name] = flat[offset : offset + m.nbytes].view(m.torch_dtype).view(m.shape)
                offset += m.nbytes

        for k, idx in enumerate(plan):
            flat = self._buffer(("receive", k), sum(meta[i].nbytes for i in idx))
            if len(inflight) == IN_FLIGHT:
                work, done, buf = inflight.pop(0)
                work.wait()
                unpack(done, buf)
            inflight.append((self._broadcast(flat), idx, flat))
        for work, done, buf in inflight:
            work.wait()
            unpack(done, buf)
        return out

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.group.shutdown()


def state_meta(
    state: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> list[TensorMeta]:
    """``TensorMeta`` of named tensors (global shapes: a DTensor is not gathered)."""
    return [TensorMeta.of(name, t, dtype) for name, t in state]


def named(
    state: dict[str, torch.Tensor], meta: Sequence[TensorMeta]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``state``'s tensors in ``meta``'s order."""
    for m in meta:
        yield m.name, state[m.name]
