"""One step's rollout: prompts -> engines -> env pools -> groups that teach -> a TrainBatch.

A ``Rollout`` holds a step's prompts, the engines' completions and the envs' rewards,
group by group. The functions here shape it for training: drop or keep stale groups,
join a refill round, count the groups that teach, and build the ``TrainBatch`` with
group-relative advantages. None of them knows whether the engines and pools are Ray
actors or objects in this process.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from orchestrator.config import PromptConfig, RunConfig
from orchestrator.data import Prompt
from orchestrator.groups import Rollout, tokenize
from orchestrator.pairs import make_pairs
from orchestrator.scoring import Scorer, Streaming
from reward_envs.protocol import RewardResult
from trainer.advantages import compute_advantages, zero_variance_groups
from trainer.protocol import TrainBatch, TrainSample


class Generator(Protocol):
    """``inference_server.router.EngineRouter`` or ``LocalRouter``."""

    def generate(
        self,
        requests: Sequence[GenerateRequest],
        on_result: Callable[[GenerateResult], Any] | None = None,
    ) -> list[GenerateResult]: ...


def sampling_params(cfg: RunConfig) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        n=r.group_size,
        temperature=r.temperature,
        top_p=r.top_p,
        max_tokens=r.max_new_tokens,
        stop=r.stop,
    )


def rollout(
    engines: Generator,
    scorer: Scorer,
    sampling: SamplingParams,
    prompts: list[Prompt],
    tok: Any,
    cache: dict[str, list[int]],
    prompt: PromptConfig | None = None,
) -> Rollout:
    """Generate ``sampling.n`` completions per prompt, then score each with its env. A prompt
    drawn twice for one step (a dataset smaller than its share of the step) is two groups:
    its second request is ``<id>#2``. Prompts not tokenized ahead are encoded in ``prompt``'s
    format."""
    seen: Counter[str] = Counter()
    requests = []
    for p in prompts:
        seen[p.id] += 1
        rid = p.id if seen[p.id] == 1 else f"{p.id}#{seen[p.id]}"
        ids = tokenize(tok, p, cache, prompt)
        requests.append(GenerateRequest(request_id=rid, sampling=sampling, prompt_ids=ids))
    results, scores, seconds = generate_scored(engines, scorer, prompts, requests)
    return Rollout(prompts, requests, results, scores, seconds)


def generate_scored(
    engines: Generator,
    scorer: Scorer,
    prompts: Sequence[Prompt],
    requests: Sequence[GenerateRequest],
) -> tuple[list[GenerateResult], list[list[RewardResult]], dict[str, float]]:
    """The engines' results for ``requests`` (``requests[i]`` asks for ``prompts[i]``) and
    their rewards, each group scored by its env as soon as the engines hand it over
    (``orchestrator.scoring.Streaming``). Seconds: generating, pool calls (summed over
    envs), and the tail from the last completion to the last reward."""
    stream = Streaming(scorer, prompts, [r.request_id for r in requests])
    t0 = time.perf_counter()
    try:
        results = engines.generate(requests, on_result=stream.add)
        t1 = time.perf_counter()
        scores = stream.wait()
    finally:
        stream.close()
    seconds = {
        "seconds/generate": t1 - t0,
        "seconds/score": stream.busy_s,
        "seconds/score_tail": time.perf_counter() - t1,
    }
    return results, scores, seconds


def select(r: Rollout, keep: list[int]) -> Rollout:
    """The groups of ``r`` at indices ``keep``."""
    return Rollout(
        [r.prompts[i] for i in keep],
        [r.requests[i] for i in keep],
        [r.results[i] for i in keep],
        [r.scores[i] for i in keep],
        r.seconds,
    )


def merge(a: Rollout, b: Rollout) -> Rollout:
    """One rollout holding the groups of both (a refill round joins the step's rollout)."""
    seconds = {k: a.seconds.get(k, 0.0) + b.seconds.get(k, 0.0) for k in a.seconds | b.seconds}
    return Rollout(
        a.prompts + b.prompts,
        a.requests + b.requests,
        a.results + b.results,
        a.scores + b.scores,
        seconds,
    )


def handle_stale(r: Rollout, version: int, bound: int, how: str) -> tuple[Rollout, int]:
    """Groups any of whose completions came from weights more than ``bound`` versions behind
    ``version``: removed (``how="drop"``) or kept for the loss's TIS correction (``"tis"``).
    Returns the rollout to train on and how many groups were stale."""
    stale = {
        i
        for i, res in enumerate(r.results)
        if any(version - c.policy_version > bound for c in res.completions)
    }
    if how == "tis" or not stale:
        return r, len(stale)
    return select(r, [i for i in range(len(r.results)) if i not in stale]), len(stale)


def teaching_groups(r: Rollout, cfg: RunConfig) -> int:
    """Groups ``build_batch`` will train on: every completion scored, and (when zero-variance
    groups are dropped) not all rewards equal (``trainer.advantages``' own test)."""
    scored = [[s.score for s in g] for g in r.scores if all(s.score is not None for s in g)]
    if not scored or not cfg.advantage.drop_zero_variance:
        return len(scored)
    return len(scored) - int(zero_variance_groups(torch.tensor(scored)).sum())


def build_batch(
    step: int, r: Rollout, cfg: RunConfig
) -> tuple[TrainBatch | None, dict[str, float]]:
    """Group advantages from the scored completions; keep the groups that teach. ``None``
    when no group teaches (every group errored or had equal rewards)."""
    samples: list[TrainSample] = []
    rewards, errors, kept, zero_var = [], 0, 0, 0
    by_kind: Counter[str] = Counter()
    for _prompt, request, result, group in zip(
        r.prompts, r.requests, r.results, r.scores, strict=True
    ):
        if any(s.score is None for s in group):
            for s in group:  # group unusable: every error counted by kind, nothing zeroed
                if s.score is None:
                    errors += 1
                    by_kind[f"reward_errors/{s.env}/{s.error_kind}"] += 1
            continue
        rw = torch.tensor([[s.score for s in group]], dtype=torch.float32)
        rewards.extend(rw[0].tolist())
        adv = compute_advantages(rw, cfg.advantage.type, cfg.advantage.scale_by_std)
        if bool(adv.zero_variance[0]):
            zero_var += 1
            if cfg.advantage.drop_zero_variance:
                continue
        kept += 1
        for i, (c, s) in enumerate(zip(result.completions, group, strict=True)):
            if c.token_ids:
                samples.append(
                    TrainSample(
                        sample_id=f"{request.request_id}/{i}",
                        prompt_ids=request.prompt_ids,
                        completion_ids=c.token_ids,
                        advantage=float(adv.values[0, i]),
                        engine_logprobs=c.logprobs or None,  # none: offline DPO rows
                        policy_version=c.policy_version,
                        engine_id=c.engine_id,
                        env=s.env,
                        env_build=s.build_hash,
                        reward=s.score,  # PPO's critic learns from it
                    )
                )
    completions = [c for res in r.results for c in res.completions]
    lengths = [len(c.token_ids) for c in completions]
    by_env: dict[str, list[float]] = {}
    for prompt, group in zip(r.prompts, r.scores, strict=True):
        by_env.setdefault(prompt.env, []).extend(s.score for s in group if s.score is not None)
    stats = {
        "response_len_mean": sum(lengths) / max(1, len(lengths)),
        "response_len_max": float(max(lengths, default=0)),
        "truncation_rate": sum(c.finish_reason == "length" for c in completions)
        / max(1, len(lengths)),
        # completions cut by max_new_tokens (neither EOS nor a stop string ended them)
        "truncated": float(sum(c.finish_reason == "length" for c in completions)),
        **{f"reward_mean/{env}": sum(v) / len(v) for env, v in by_env.items() if v},
        "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
        "groups_kept": float(kept),
        "groups_zero_variance": float(zero_var),
        "reward_errors": float(errors),
        # with reward_errors: every completion of the step, scored or errored
        "items_scored": float(sum(s.score is not None for g in r.scores for s in g)),
        **{k: float(v) for k, v in by_kind.items()},
    }
    if cfg.algorithm == "dpo":  # preference pairs instead of advantages
        samples, pair_stats = make_pairs(r, cfg.dpo.margin)
        stats |= pair_stats | {"groups_kept": pair_stats["pairs"]}  # a group gives one pair
    if not samples:
        return None, stats
    batch = TrainBatch(
        step=step,
        samples=samples,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,  # the trainer's policy is the sampling policy
    )
    return batch, stats


def refill(
    r: Rollout,
    draw: Callable[[list[Prompt]], Rollout],
    sample: Callable[[int], list[Prompt]],
    cfg: RunConfig,
) -> tuple[Rollout, dict[str, float]]:
    """Dynamic sampling (DAPO): while fewer than ``prompts_per_step`` groups teach, draw that
    many more prompts and roll them out too, at most ``advantage.refill_rounds`` times."""
    rounds = prompts = 0
    while rounds < cfg.advantage.refill_rounds:
        missing = cfg.rollout.prompts_per_step - teaching_groups(r, cfg)
        if missing <= 0:
            break
        r = merge(r, draw(sample(missing)))
        rounds, prompts = rounds + 1, prompts + missing
    return r, {"refill_rounds": float(rounds), "refill_prompts": float(prompts)}


def staleness(r: Rollout, version: int) -> dict[str, float]:
    """How many versions behind ``version`` each completion's weights were."""
    lags = [version - c.policy_version for res in r.results for c in res.completions]
    return {
        "staleness_max": float(max(lags, default=0)),
        **{f"staleness/{k}": float(lags.count(k)) for k in sorted(set(lags))},
    }
