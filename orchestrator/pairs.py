"""Online DPO from verifiable rewards: a step's scored groups -> preference pairs.

Each group (``rollout.group_size`` completions of one prompt, every one scored by its env)
gives at most one pair: its best completion (chosen) against its worst (rejected), when
their scores differ by more than ``dpo.margin``; ties go to the earlier completion. A group
with an errored completion, or whose best or worst completion is empty, gives none. The
pair's two ``TrainSample``s carry the same ``pair`` id, which the trainer uses to keep them
together (trainer/preference.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.protocol import TrainSample

if TYPE_CHECKING:
    from orchestrator.rollout import Rollout


def make_pairs(r: Rollout, margin: float) -> tuple[list[TrainSample], dict[str, float]]:
    """The pairs of ``r``'s groups as samples (chosen first), and ``pairs``,
    ``pairs/no_gap`` (groups whose best and worst differ by no more than ``margin``) and
    ``pairs/score_gap`` (mean chosen minus rejected score)."""
    samples: list[TrainSample] = []
    no_gap, gaps = 0, list[float]()
    for request, result, group in zip(r.requests, r.results, r.scores, strict=True):
        if any(s.score is None for s in group):
            continue  # counted as reward errors by build_batch
        scores = [float(s.score) for s in group if s.score is not None]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] - scores[worst] <= margin:
            no_gap += 1
            continue
        chosen, rejected = result.completions[best], result.completions[worst]
        if not chosen.token_ids or not rejected.token_ids:
            continue
        pair = len(gaps)
        gaps.append(scores[best] - scores[worst])
        for i, c, is_chosen in ((best, chosen, True), (worst, rejected, False)):
            samples.append(
                TrainSample(
                    sample_id=f"{request.request_id}/{i}",
                    prompt_ids=request.prompt_ids,
                    completion_ids=c.token_ids,
                    advantage=0.0,
                    engine_logprobs=c.logprobs,
                    policy_version=c.policy_version,
                    engine_id=c.engine_id,
                    env=group[i].env,
                    env_build=group[i].build_hash,
                    reward=scores[i],
                    pair=pair,
                    chosen=is_chosen,
                )
            )
    stats = {
        "pairs": float(len(gaps)),
        "pairs/no_gap": float(no_gap),
        "pairs/score_gap": sum(gaps) / len(gaps) if gaps else 0.0,
    }
    return samples, stats
