"""Wire protocol of the inference server: generation requests and their completions.

Owned by the inference server, imported by the orchestrator. Every completion
carries its provenance: the policy version that produced it and the engine id.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class SamplingParams(BaseModel):
    """How to sample; the same knobs vLLM's ``SamplingParams`` has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, le=1024)
    """Completions per prompt (the group size G)."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """0 means greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens; 0 turns it off."""
    max_tokens: int = Field(64, ge=1)
    """Generation cap in tokens."""
    stop: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    """Strings that end a completion (besides EOS): its text ends before the string, its
    token ids and logprobs run to the token that completed it (vLLM's rule, both backends)."""
    seed: int | None = None
    """Seed for this request's sampling; None draws from the engine's RNG."""


class GenerateRequest(BaseModel):
    """One prompt, already tokenized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    """Caller's id, echoed in the result (prompt id in the RL loop)."""
    prompt_ids: list[int] = Field(min_length=1)
    """Prompt token ids, BOS included if the model wants one."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """Sampling parameters."""


class Completion(BaseModel):
    """One sampled completion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_ids: list[int]
    """Sampled token ids (EOS included when generation stopped on it; the token that
    completed a stop string too)."""
    text: str
    """Decoded text, special tokens stripped, cut before the stop string that ended it."""
    logprobs: list[float]
    """Logprob of each sampled token under the sampling distribution (after temperature)."""
    finish_reason: Literal["stop", "length", "abort"]
    """stop: EOS or a stop string; length: hit max_tokens; abort: cancelled."""
    policy_version: int
    """Weight version of the engine when it produced this completion."""
    engine_id: str
    """Which engine produced it."""


class GenerateResult(BaseModel):
    """The ``n`` completions of one request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    """The request's id."""
    completions: list[Completion]
    """``sampling.n`` completions, in sampling order."""
