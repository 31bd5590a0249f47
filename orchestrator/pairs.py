"""Online DPO from verifiable rewards: a step's scored groups -> preference pairs.

Each group (``rollout.group_size`` completions of one prompt, every one scored by its env)
gives at most one pair: its best completion (chosen) against its worst (rejected), when
their scores differ by more than ``dpo.margin``; ties go to the earlier completion. A group
with an errored completion, or whose best or worst completion is empty, gives none. The
pair's two ``TrainSample``s carry the same ``pair`` id, which the trainer uses to keep them
together (trainer/preference.py).

Offline DPO reads the pairs from a preference dataset instead (``offline_rollout``): each
row becomes a group of two completions, chosen scored 1 and rejected 0, and goes through
the same ``build_batch`` and ``make_pairs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trainer.protocol import TrainSample

if TYPE_CHECKING:
    from orchestrator.config import PromptConfig
    from orchestrator.data import Prompt
    from orchestrator.groups import Rollout


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
                    engine_logprobs=c.logprobs or None,  # offline pairs have none
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


def offline_rollout(
    prompts: list[Prompt],
    tok: Any,
    cache: dict[str, list[int]],
    prompt: PromptConfig | None = None,
    version: Callable[[], int] = lambda: 0,
) -> Rollout:
    """Offline DPO (``dpo.mode = "offline"``): a step's rows of a preference dataset as the
    rollout the engines would have made, so that the loop, ``build_batch`` and
    ``make_pairs`` are the online ones. Each row's ``chosen`` and ``rejected`` texts are a
    group of two completions scored 1 and 0 (no env is called), tokenized without special
    tokens, the tokenizer's EOS appended. They carry no engine logprobs and are tagged with
    the version the engines serve (``version()``): they come from no policy, so they are
    never stale."""
    from inference_server.protocol import Completion, GenerateRequest, GenerateResult
    from orchestrator.groups import Rollout, tokenize
    from reward_envs.protocol import RewardResult

    requests, results, scores = [], [], []
    served = version()
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    for p in prompts:
        missing = [k for k in ("chosen", "rejected") if not isinstance(p.fields.get(k), str)]
        if missing:
            raise ValueError(
                f"prompt {p.id}: dpo.mode = 'offline' reads a preference dataset, whose rows "
                f"need text columns 'chosen' and 'rejected'; this row lacks {missing} (map "
                "other column names with the dataset's fields = { chosen = ..., rejected = "
                "... }})"
            )
        ids = tokenize(tok, p, cache, prompt)
        completions = [
            Completion(
                token_ids=list(tok(p.fields[k], add_special_tokens=False)["input_ids"]) + eos,
                text=p.fields[k],
                logprobs=[],
                finish_reason="stop",
                policy_version=served,
                engine_id="dataset",
            )
            for k in ("chosen", "rejected")
        ]
        requests.append(GenerateRequest(request_id=p.id, prompt_ids=ids))
        results.append(GenerateResult(request_id=p.id, completions=completions))
        scores.append(
            [RewardResult(s, None, None, {}, p.env, "dataset", "dataset") for s in (1.0, 0.0)]
        )
    return Rollout(list(prompts), requests, results, scores)
