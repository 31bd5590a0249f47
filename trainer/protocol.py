"""Wire protocol into the trainer: scored samples of one optimizer step.

Owned by the trainer (the server side of the orchestrator -> trainer boundary)
and imported by both sides. Pure pydantic, no torch.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainSample(BaseModel):
    """One completion with its advantage, ready for the loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_id: str
    """Stable id (prompt id + sample index) so every sample can be traced end to end."""
    prompt_ids: list[int] = Field(min_length=1)
    """Prompt token ids as fed to the engine (BOS included if the engine added it)."""
    completion_ids: list[int] = Field(min_length=1)
    """Sampled completion token ids (EOS included when the engine stopped on it)."""
    advantage: float
    """Group-relative advantage of this completion."""
    engine_logprobs: list[float] | None = None
    """Logprobs the inference engine reported for each completion token (for TIS)."""
    policy_version: int = Field(0, ge=0)
    """Weight version that generated the completion."""
    engine_id: str = ""
    """Inference engine that generated it."""
    env: str = ""
    """Reward env that scored it."""
    env_build: str = ""
    """Content hash of that env's build."""
    reward: float | None = None
    """The env's score of this completion (what PPO's critic learns; DPO's pairs are made
    from it)."""
    pair: int | None = Field(None, ge=0)
    """DPO: the preference pair this completion belongs to (both completions of a pair carry
    it, and the trainer keeps them on one rank). None outside DPO."""
    chosen: bool | None = None
    """DPO: True for the pair's preferred completion, False for the rejected one."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainSample:
        if not math.isfinite(self.advantage):
            raise ValueError(f"sample {self.sample_id}: advantage is {self.advantage}")
        if self.engine_logprobs is not None and len(self.engine_logprobs) != len(
            self.completion_ids
        ):
            raise ValueError(
                f"sample {self.sample_id}: {len(self.engine_logprobs)} engine logprobs for "
                f"{len(self.completion_ids)} completion tokens"
            )
        if (self.pair is None) != (self.chosen is None):
            raise ValueError(f"sample {self.sample_id}: pair and chosen go together")
        return self


class TrainBatch(BaseModel):
    """All samples of one optimizer step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=0)
    """Optimizer step this batch is for (the policy version it will produce minus one)."""
    samples: list[TrainSample] = Field(min_length=1)
    """Scored samples; zero-variance groups are already dropped if the config says so."""
    max_completion_length: int = Field(ge=1)
    """Generation cap in tokens; Dr. GRPO's constant normaliser."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature the engines generated ``samples`` at. The trainer's policy is the
    sampling policy ``softmax(logits / temperature)``: its logprobs (ratio, TIS weights against
    ``engine_logprobs``, which engines report after temperature), the reference model's (KL)
    and the entropy are all computed at this temperature. Engines must sample with top_p 1 and
    top_k off for the two to be the same distribution."""

    @model_validator(mode="after")
    def _whole_pairs(self) -> TrainBatch:
        paired = [s for s in self.samples if s.pair is not None]
        if not paired:
            return self
        if len(paired) != len(self.samples):
            raise ValueError("a batch of preference pairs has samples without a pair")
        sides: dict[int, list[TrainSample]] = {}
        for s in paired:
            sides.setdefault(s.pair or 0, []).append(s)
        for pair, both in sides.items():
            if sorted(bool(s.chosen) for s in both) != [False, True]:
                raise ValueError(f"pair {pair} needs one chosen and one rejected completion")
            if both[0].prompt_ids != both[1].prompt_ids:
                raise ValueError(f"pair {pair}: its two completions answer different prompts")
        return self

    def pairs(self) -> list[tuple[int, int]]:
        """(chosen, rejected) sample indices of each preference pair, by pair id."""
        sides: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            if s.pair is not None:
                sides.setdefault(s.pair, [-1, -1])[0 if s.chosen else 1] = i
        return [(c, r) for _, (c, r) in sorted(sides.items())]
