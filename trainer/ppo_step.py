"""PPO's training step on the trainer ranks: scored completions in, one new policy version
(and a trained critic) out.

``ppo_step(trainer, batch)`` is what ``Trainer.train_step`` runs when ``trainer.loss.type``
is ``ppo``. Samples carry their env's score (``TrainSample.reward``). As for GRPO, the
samples are split into ``updates_per_batch`` mini-batches and each over the ranks; a
completion never spans two micro-batches, so its whole token sequence is at hand:

1. a pass without grad gives, per micro-batch, the policy's logprobs (the ratio's
   denominator), the critic's values and, with ``kl_coef > 0``, the reference's logprobs;
2. per completion: token rewards (score on the last token, minus the KL penalty), GAE
   advantages and returns (``trainer.ppo``); advantages whitened over the whole batch's
   tokens, every rank's (sums all-reduced);
3. per mini-batch: the clipped policy loss and the clipped value loss, each a token sum
   over the mini-batch's token count, one backward for both (disjoint parameters), then the
   policy steps (``Trainer._step_optimizer``) and the critic steps (its own AdamW, clip).

Metrics (token-weighted over the batch): ``loss`` (policy), ``value/loss``,
``value/mean``, ``value/clip_frac``, ``returns/mean``, ``advantages/mean`` (before
whitening), ``clip/frac``, ``approx_kl``, ``kl_ref`` (with a reference), ``critic/grad_norm``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from trainer import ppo
from trainer.config import PPOLoss
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import minibatches, shard
from trainer.protocol import TrainBatch


def _flat(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` back to the flat ``[N]`` stream (row-major over the mask: sequence order)."""
    return x[mask]


def ppo_step(tr: Any, batch: TrainBatch) -> dict[str, float]:
    """``updates_per_batch`` PPO updates of the policy and the critic on ``batch``."""
    cfg = tr.cfg.loss
    assert isinstance(cfg, PPOLoss) and tr.critic is not None
    ref_model: Any = tr.ref_model  # loaded when kl_coef > 0
    missing = [s.sample_id for s in batch.samples if s.reward is None]
    if missing:
        raise ValueError(
            f"PPO learns from each completion's score, but samples {missing[:3]} carry no "
            "reward: set algorithm = 'ppo' in the run config"
        )
    t0 = time.perf_counter()
    temperature = batch.temperature
    lengths = [len(s.completion_ids) for s in batch.samples]
    parts = minibatches(lengths, tr.cfg.updates_per_batch)
    updates = []
    for part in parts:
        mine = shard([lengths[i] for i in part], tr.rank, tr.world)
        updates.append(tr.layout(batch, [part[i] for i in mine]))
    every = [mb for micro in updates for mb in micro]

    # 1. the rollout's numbers, no grad
    idle = tr._idle_passes(len(every))
    olds, values, refs = [], [], []
    with torch.no_grad():
        for mb in every:
            olds.append(tr.policy(mb, temperature)[0])
            values.append(tr.critic(mb))
            if cfg.kl_coef > 0:
                with tr.policy.compute():
                    refs.append(
                        micro_batch_logprobs(ref_model, mb, tr.cfg.logprob_chunk_size, temperature)[
                            0
                        ]
                    )
        if idle:
            spare = tr._spare(batch)
            for _ in range(idle):
                tr.policy(spare, temperature)
                tr.critic(spare)

    # 2. GAE per completion, whitening over every rank's tokens
    advantages, returns = [], []
    sums: dict[str, float] = {}
    for j, mb in enumerate(every):
        s = len(mb.sample_ids)
        ids = mb.seq_ids.to(olds[j].device)
        v, mask = ppo.to_padded(values[j], ids, s)
        scores = torch.tensor(
            [batch.samples[i].reward or 0.0 for i in mb.sample_ids], device=v.device
        )
        lp = ppo.to_padded(olds[j], ids, s)[0] if refs else None
        ref = ppo.to_padded(refs[j], ids, s)[0] if refs else None
        rewards = ppo.token_rewards(scores, mask, lp, ref, cfg.kl_coef)
        adv, ret = ppo.gae(rewards, v, mask, cfg.gamma, cfg.lam)
        advantages.append(_flat(adv, mask))
        returns.append(_flat(ret, mask))
        n = len(mb.target_ids)
        _add(sums, "advantages/mean", float(advantages[-1].mean()), n)
        _add(sums, "returns/mean", float(returns[-1].mean()), n)
        _add(sums, "value/mean", float(values[j].mean()), n)
        if refs:
            _add(sums, "kl_ref", float((olds[j] - refs[j]).mean()), n)
    if cfg.whiten_advantages:
        advantages = _whiten(tr, advantages)

    # 3. the updates
    k = 0
    total_loss, grad_norm, critic_norm, lr = 0.0, 0.0, 0.0, 0.0
    for part, micro in zip(parts, updates, strict=True):
        num_tokens = sum(lengths[i] for i in part)
        lr += float(tr.scheduler.get_last_lr()[0])
        tr.optimizer.zero_grad(set_to_none=True)
        tr.critic_optimizer.zero_grad(set_to_none=True)
        idle = tr._idle_passes(len(micro))
        for mb in micro:
            logps, _ = tr.policy(mb, temperature)
            new_values = tr.critic(mb)
            n = len(mb.target_ids)
            ones = torch.ones_like(logps)
            pl, pm = ppo.policy_loss(logps, olds[k], advantages[k], ones, cfg.eps)
            vl, vm = ppo.value_loss(new_values, values[k], returns[k], ones, cfg.value_clip)
            scale = n / num_tokens  # token sums over the mini-batch's tokens
            loss: Any = (pl + vl) * scale
            (loss * tr.world if tr.sharded else loss).backward()  # FSDP2 averages
            total_loss += float(pl.detach()) * scale
            _add(sums, "value/loss", float(vl.detach()), n)
            for key, val in (pm | vm).items():
                _add(sums, key, val, n)
            k += 1
        if idle:
            spare = tr._spare(batch)
            for _ in range(idle):
                logps, _ = tr.policy(spare, temperature)
                (logps.sum() * 0.0 + tr.critic(spare).sum() * 0.0).backward()
        grad_norm += tr._step_optimizer()
        critic_norm += _step_critic(tr)
    tr.version += 1
    summary, sums = tr.summary(t0, len(parts), every, total_loss, grad_norm, lr, sums)
    out = {key: v / sum(lengths) for key, v in sums.items()}
    return out | summary | {"critic/grad_norm": critic_norm / len(parts)}


def _add(sums: dict[str, float], key: str, value: float, n: int) -> None:
    sums[key] = sums.get(key, 0.0) + value * n


def _whiten(tr: Any, advantages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Advantages over every rank's tokens to mean 0 and (unbiased) variance 1."""
    flat = torch.cat(advantages) if advantages else torch.zeros(0)
    stats = torch.tensor([float(flat.numel()), float(flat.sum())], dtype=torch.float64)
    if tr.world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    n, total = stats.tolist()
    if n < 2:
        raise ValueError("whitening needs 2 tokens; set trainer.loss.whiten_advantages = false")
    mean = total / n
    sq = torch.tensor([float(((flat.double() - mean) ** 2).sum())], dtype=torch.float64)
    if tr.world > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    scale = float(torch.rsqrt(sq / (n - 1) + 1e-8))
    return [(a - mean) * scale for a in advantages]


def _step_critic(tr: Any) -> float:
    """Sum the critic's gradients over ranks (replicate), clip, step; the norm before."""
    assert tr.critic is not None
    if tr.world > 1 and not tr.sharded:
        for p in tr.critic.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    norm: Any = torch.nn.utils.clip_grad_norm_(tr.critic.parameters(), tr.cfg.max_grad_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    tr.critic_optimizer.step()
    return float(norm)
