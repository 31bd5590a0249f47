"""Score a step's completions with the envs their prompts belong to, one pool call per env.

Errors stay errors (a ``RewardResult`` with ``error`` set, never a 0): the
caller decides what an unscored group means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from inference_server.protocol import GenerateResult
from orchestrator.data import Prompt
from reward_envs.protocol import Item, RewardResult


class Scorer(Protocol):
    """``reward_envs.scorer.LocalScorer`` or ``RayScorer``."""

    def score(self, env: str, items: Sequence[Item]) -> list[RewardResult]: ...


def score_groups(
    scorer: Scorer, prompts: Sequence[Prompt], results: Sequence[GenerateResult]
) -> list[list[RewardResult]]:
    """Rewards for every completion of every prompt, grouped like ``results``."""
    by_env: dict[str, list[tuple[int, int]]] = {}
    for p_i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        for c_i in range(len(result.completions)):
            by_env.setdefault(prompt.env, []).append((p_i, c_i))
    out: list[list[RewardResult | None]] = [[None] * len(r.completions) for r in results]
    for env, where in by_env.items():
        items = [
            Item(prompts[p].text, results[p].completions[c].text, dict(prompts[p].fields))
            for p, c in where
        ]
        for (p, c), r in zip(where, scorer.score(env, items), strict=True):
            out[p][c] = r
    return [[r for r in group if r is not None] for group in out]
