"""DPO's training step on the trainer ranks: preference pairs in, one new policy version out.

``dpo_step(trainer, batch)`` is what ``Trainer.train_step`` runs when ``trainer.loss.type``
is ``dpo``. The batch's samples come in pairs (``TrainSample.pair``/``chosen``); a pair is
the unit of every split, so both completions of a pair are always in the same mini-batch
and on the same rank:

1. the pairs are split, in order and balanced by tokens, into ``updates_per_batch``
   mini-batches (``minibatches``), and each mini-batch's pairs over the ranks (``shard``);
2. per mini-batch, this rank's completions are laid out in micro-batches as the GRPO path
   does (packed or padded: the two completions of a pair may land in different ones),
3. a pass without grad gives every completion's sequence logprob under the policy and the
   frozen reference (the initial policy); the DPO loss of the pairs, normalised by the
   *mini-batch's* pair count, is differentiated with respect to those sequence logprobs
   only (``g = dL/d logp``, one number per completion),
4. a second pass with grad backpropagates ``sum(g x logp)`` per micro-batch, whose
   gradient is exactly the DPO loss's, then gradients are summed over ranks as for GRPO
   (``Trainer``'s replicate path, or FSDP2's own reduction) and AdamW steps.

Metrics (summed over ranks, then divided by the step's pairs): ``dpo/margin``,
``dpo/accuracy``, ``dpo/chosen_reward``, ``dpo/rejected_reward``, and ``pairs``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from trainer.config import DPOLoss
from trainer.dpo import DPOInputs, DPOParams, dpo_loss
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import MicroBatch, minibatches, shard
from trainer.protocol import TrainBatch


def _sequence_sums(logps: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """``[S]`` sum of each local sequence's token logprobs."""
    ids = mb.seq_ids.to(logps.device)
    return logps.new_zeros(len(mb.sample_ids)).index_add(0, ids, logps)


def dpo_step(tr: Any, batch: TrainBatch) -> dict[str, float]:
    """``updates_per_batch`` optimizer updates of the DPO loss ``tr.cfg.loss`` on the pairs
    of ``batch``; returns the step's metrics (one new policy version)."""
    t0 = time.perf_counter()
    pairs = batch.pairs()
    if not pairs:
        raise ValueError(
            "trainer.loss.type = 'dpo' trains on preference pairs, but the batch has none: "
            "set algorithm = 'dpo' in the run config so that the loop makes pairs"
        )
    size = [
        len(batch.samples[c].completion_ids) + len(batch.samples[r].completion_ids)
        for c, r in pairs
    ]
    parts = minibatches(size, tr.cfg.updates_per_batch)
    sums: dict[str, float] = {}
    total_loss, grad_norm, lr = 0.0, 0.0, 0.0
    every: list[MicroBatch] = []
    for part in parts:
        mine = [pairs[part[i]] for i in shard([size[i] for i in part], tr.rank, tr.world)]
        lr += float(tr.scheduler.get_last_lr()[0])
        loss, norm, micro = _update(tr, batch, mine, len(part), sums)
        total_loss, grad_norm = total_loss + loss, grad_norm + norm
        every.extend(micro)
    tr.version += 1
    summary, sums = tr.summary(t0, len(parts), every, total_loss, grad_norm, lr, sums)
    out = {k: v / len(pairs) for k, v in sums.items()}
    return out | summary | {"pairs": float(len(pairs))}


def _update(
    tr: Any,
    batch: TrainBatch,
    pairs: list[tuple[int, int]],
    num_pairs: int,
    sums: dict[str, float],
) -> tuple[float, float, list[MicroBatch]]:
    """One optimizer step on this rank's ``pairs`` of a mini-batch of ``num_pairs`` pairs;
    adds metric sums to ``sums``. Returns this rank's loss, the gradient norm and the
    micro-batches it ran."""
    indices = [i for pair in pairs for i in pair]
    micro = tr.layout(batch, indices)
    temperature = batch.temperature
    ref_model: Any = tr.ref_model  # always loaded under the DPO loss
    # pass 1, no grad: sequence logprobs under the policy and the frozen reference
    policy_seq: dict[int, float] = {}
    ref_seq: dict[int, float] = {}
    idle = tr._idle_passes(len(micro))
    with torch.no_grad():
        for mb in micro:
            logps, _ = tr.policy(mb, temperature)
            with tr.policy.compute():
                ref, _ = micro_batch_logprobs(ref_model, mb, tr.cfg.logprob_chunk_size, temperature)
            for i, p, r in zip(
                mb.sample_ids,
                _sequence_sums(logps, mb).tolist(),
                _sequence_sums(ref, mb).tolist(),
                strict=True,
            ):
                policy_seq[i], ref_seq[i] = p, r
        for _ in range(idle):
            tr.policy(tr._spare(batch), temperature)
    # the loss of the pairs, differentiated w.r.t. the sequence logprobs only
    weight: dict[int, float] = {}
    loss_value = 0.0
    if pairs:
        chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]

        def seq(values: dict[int, float], which: list[int]) -> torch.Tensor:
            return torch.tensor([values[i] for i in which], dtype=torch.float64)

        def length(which: list[int]) -> torch.Tensor:
            return torch.tensor([len(batch.samples[i].completion_ids) for i in which])

        c_lp = seq(policy_seq, chosen).requires_grad_()
        r_lp = seq(policy_seq, rejected).requires_grad_()
        inputs = DPOInputs(
            c_lp,
            r_lp,
            seq(ref_seq, chosen),
            seq(ref_seq, rejected),
            length(chosen),
            length(rejected),
            num_pairs,
        )
        cfg = tr.cfg.loss
        assert isinstance(cfg, DPOLoss)
        params = DPOParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        loss, metrics = dpo_loss(cfg.variant, inputs, params)
        loss.backward()
        assert c_lp.grad is not None and r_lp.grad is not None
        grads = c_lp.grad.tolist() + r_lp.grad.tolist()
        weight = dict(zip(chosen + rejected, grads, strict=True))
        loss_value = float(loss.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    # pass 2, with grad: sum(g x logp) has the DPO loss's gradient
    tr.optimizer.zero_grad(set_to_none=True)
    idle = tr._idle_passes(len(micro))
    for mb in micro:
        logps, _ = tr.policy(mb, temperature)
        g = torch.tensor([weight[i] for i in mb.sample_ids], device=logps.device)
        surrogate: Any = (_sequence_sums(logps, mb) * g).sum()
        (surrogate * tr.world if tr.sharded else surrogate).backward()  # FSDP2 averages
    for _ in range(idle):
        logps, _ = tr.policy(tr._spare(batch), temperature)
        (logps.sum() * 0.0).backward()
    return loss_value, tr._step_optimizer(), micro
