"""A step's groups: ``Rollout`` (prompts, requests, the engines' results, the envs'
rewards) and ``tokenize``, shared by the rollout path (``orchestrator.rollout``) and the
preference pairs made from it or read from a dataset (``orchestrator.pairs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inference_server.protocol import GenerateRequest, GenerateResult
from inference_server.tokens import encode_prompts
from orchestrator.config import PromptConfig
from orchestrator.data import Prompt
from reward_envs.protocol import RewardResult


@dataclass
class Rollout:
    """One step's prompts, what the engines made of them and what the envs said."""

    prompts: list[Prompt]
    requests: list[GenerateRequest]
    results: list[GenerateResult]
    scores: list[list[RewardResult]]
    seconds: dict[str, float] = field(default_factory=dict)


def tokenize(
    tok: Any, p: Prompt, cache: dict[str, list[int]], prompt: PromptConfig | None = None
) -> list[int]:
    """The prompt's token ids in ``prompt``'s format (default: plain, ``<s>`` + text):
    prepared ahead (``caravela data prepare``, or the prefetcher), else tokenized once per
    prompt per run."""
    if p.prompt_ids is not None:
        return list(p.prompt_ids)
    if p.id not in cache:
        fmt = prompt or PromptConfig()
        (cache[p.id],) = encode_prompts(tok, [p.text], fmt.format, fmt.system)
    return cache[p.id]
