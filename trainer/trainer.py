"""The single-process training step: scored samples in, one new policy version out.

``Trainer`` is a plain class (unit tests construct it directly; the Ray actor
group wraps it later). One ``train_step``:

1. splits the samples, in order and balanced by tokens, into ``updates_per_batch``
   (mu) mini-batches (``minibatches``) and lays each out in micro-batches (packed
   or padded, ``trainer.packing``),
2. with mu > 1, computes the "old" logprobs of every sample once, without grad,
   under the weights before the first update: the denominator of every
   importance ratio of the step. With mu = 1 the old policy is the current one:
   the ratio is exactly 1 and ``old_logprobs`` are the detached current
   logprobs (no extra forward),
3. per mini-batch (one optimizer update each): per micro-batch, forward to the
   final hidden states, chunked per-token logprobs of the completion tokens at
   the batch's sampling temperature, the configured policy loss normalised by
   the mini-batch's sequence/token counts, backward (gradient accumulation);
   then clips the gradient norm and steps AdamW.

The policy version advances by one per ``train_step`` whatever mu is: one batch,
one set of weights pushed to the engines.

Precision: the parameters and AdamW's state are ``master_dtype``; the passes compute in
``dtype``. Mixed precision (bf16 over fp32) runs every pass under ``torch.autocast`` and,
under FSDP2, gathers bf16 parameters and reduces gradients in fp32
(``MixedPrecisionPolicy``). ``state_dict`` exports the weights in ``dtype``, what the
engines serve.

Data parallel (``torch.distributed`` initialised, e.g. by the Ray trainer group):
every rank receives the whole batch, takes its share of each mini-batch
(balanced by tokens, ``shard``), normalises its loss by the *whole* mini-batch's
counts and, after its backward passes, all-reduces (sums) the gradients. Every
rank makes the same mu updates (and, under FSDP2, as many forward/backward
passes: idle ones where its share is smaller). The update is therefore the
single-process update, whatever the number of ranks (tested); metrics are summed
across ranks the same way.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import DPOLoss, PPOLoss, TrainerConfig
from trainer.critic import Critic, shard_critic
from trainer.logprobs import PolicyLogprobs, micro_batch_logprobs
from trainer.loss import LossInputs, LossParams, policy_loss
from trainer.packing import (
    MicroBatch,
    build_packed,
    build_padded,
    minibatches,
    padding_fraction,
    shard,
)
from trainer.protocol import TrainBatch
from trainer.schedule import lr_lambda


def fsdp2(policy: PolicyLogprobs, compute_dtype: torch.dtype | None = None) -> None:
    """Shard ``policy`` over the default process group: one FSDP2 unit per decoder layer
    (the model's ``_no_split_modules``), the rest in the root; gradients are summed over
    ranks, not averaged, like the replicate path (whole-batch normalisers do the mean): FSDP2
    averages, so the trainer scales each rank's loss by the world size (a divide factor of 1
    would need PREMUL_SUM, which gloo lacks).

    ``compute_dtype`` (mixed precision): every unit gathers its parameters in that dtype for
    the passes and reduces the gradients in float32 into the sharded parameters, which keep
    their own (master) dtype, like the optimizer state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()  # every tensor in the parameters' dtype
    if compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)

    layers = set(getattr(policy.model, "_no_split_modules", None) or ())
    if not layers:
        raise ValueError(
            f"{type(policy.model).__name__} names no decoder layer class (_no_split_modules); "
            "FSDP2 needs one unit per layer: use trainer.sharding = 'replicate'"
        )
    for m in list(policy.model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)


class Trainer:
    """Owns the policy model, its optimiser and (when ``kl_beta > 0``) a frozen reference."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainerConfig,
        pad_id: int = 0,
        total_updates: int | None = None,
        critic: nn.Module | None = None,
    ) -> None:
        """``total_updates``: the optimizer updates of the whole run (its steps x
        ``updates_per_batch``), what ``linear``/``cosine`` ``lr_schedule``s decay over;
        None (unit tests, benchmarks) only with the ``constant`` one. ``critic``: PPO's
        value model's causal LM (``trainer.loss.critic_model``); None with PPO: a copy of
        ``model``."""
        self.cfg = cfg
        self.model = model
        self.pad_id = pad_id
        torch.manual_seed(cfg.seed)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        model.train()
        master = getattr(torch, cfg.master_dtype)
        wrong = {str(p.dtype) for p in model.parameters() if p.dtype != master}
        if wrong:
            raise ValueError(
                f"the model's parameters are {sorted(wrong)} but trainer.master_dtype is "
                f"{cfg.master_dtype!r}; load the model in master_dtype (trainer.dtype is the "
                "compute dtype)"
            )
        self.compute_dtype: torch.dtype = getattr(torch, cfg.dtype)
        """What the passes compute in and ``state_dict`` exports (the engines' dtype)."""
        mixed = self.compute_dtype if cfg.dtype != cfg.master_dtype else None
        self.ref_model = None
        self.dpo = isinstance(cfg.loss, DPOLoss)
        """DPO: ``train_step`` runs ``trainer.preference.dpo_step`` on preference pairs."""
        if isinstance(cfg.loss, PPOLoss):
            needs_ref = cfg.loss.kl_coef > 0
        else:
            needs_ref = isinstance(cfg.loss, DPOLoss) or cfg.loss.kl_beta > 0
        if needs_ref:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.critic: Critic | None = None
        """PPO's value model (``trainer.critic``), trained by ``trainer.ppo_step``."""
        if isinstance(cfg.loss, PPOLoss):
            lm = copy.deepcopy(model) if critic is None else critic
            self.critic = Critic(lm, autocast=mixed).train()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.sharded = cfg.sharding == "fsdp2" and distributed  # world 1 too
        # mixed precision: autocast on every path. Under FSDP2 the MixedPrecisionPolicy already
        # hands the passes bf16 parameters and inputs, so autocast casts nothing there (on CPU
        # the 2-rank mixed test's weights after 5 steps were bitwise equal with and without
        # it); it stays so that every path, the unsharded reference model's too, follows the
        # same op-dtype rules
        self.policy = PolicyLogprobs(model, cfg.logprob_chunk_size, autocast=mixed)
        if self.sharded:
            fsdp2(self.policy, mixed)
            if self.critic is not None:
                shard_critic(self.critic, mixed)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        if self.critic is not None:
            assert isinstance(cfg.loss, PPOLoss)
            self.critic_optimizer = torch.optim.AdamW(
                self.critic.parameters(),
                lr=cfg.loss.critic_lr,
                betas=cfg.betas,
                weight_decay=cfg.weight_decay,
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_updates)
        )
        self.loss_params = LossParams()
        if not isinstance(cfg.loss, DPOLoss | PPOLoss):
            self.loss_params = LossParams(
                eps_low=cfg.loss.eps_low,
                eps_high=cfg.loss.eps_high,
                kl_beta=cfg.loss.kl_beta,
                tis_cap=cfg.loss.tis_cap,
            )
        self.version = 0

    def layout(self, batch: TrainBatch, indices: list[int] | None = None) -> list[MicroBatch]:
        """Micro-batches of the samples at ``indices`` (all by default); sample ids index
        ``batch.samples``."""
        indices = list(range(len(batch.samples))) if indices is None else indices
        if not indices:  # a rank whose share is empty (fewer samples than ranks)
            return []
        seqs = [(batch.samples[i].prompt_ids, batch.samples[i].completion_ids) for i in indices]
        if self.cfg.layout == "packed":
            micro = build_packed(
                seqs, self.cfg.max_tokens_per_micro_batch, self.cfg.pack_row_tokens, self.pad_id
            )
        else:
            micro = build_padded(seqs, self.cfg.max_tokens_per_micro_batch, self.pad_id)
        for mb in micro:
            mb.sample_ids = [indices[i] for i in mb.sample_ids]
        return micro

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """``updates_per_batch`` optimizer updates on ``batch`` (one new policy version);
        returns metrics: token-weighted means over the whole batch (so over the updates), loss,
        gradient norm and learning rate averaged over the updates."""
        if self.dpo:
            from trainer.preference import dpo_step

            return dpo_step(self, batch)
        if self.critic is not None:
            from trainer.ppo_step import ppo_step

            return ppo_step(self, batch)
        t0 = time.perf_counter()
        lengths = [len(s.completion_ids) for s in batch.samples]
        parts = minibatches(lengths, self.cfg.updates_per_batch)
        updates = []  # per mini-batch: the micro-batches of this rank's share
        for part in parts:
            mine = shard([lengths[i] for i in part], self.rank, self.world)
            updates.append(self.layout(batch, [part[i] for i in mine]))
        # the ratio's denominator: the policy before the first update (with one update, the
        # current logprobs themselves, detached: no extra forward)
        old = self._old_logprobs(batch, updates) if len(parts) > 1 else None
        sums: dict[str, float] = {}
        total_loss, grad_norm, lr = 0.0, 0.0, 0.0
        for k, (part, micro) in enumerate(zip(parts, updates, strict=True)):
            lr += float(self.scheduler.get_last_lr()[0])  # what this update steps with
            loss, norm = self._update(batch, part, micro, None if old is None else old[k], sums)
            total_loss += loss
            grad_norm += norm
        self.version += 1
        every = [mb for micro in updates for mb in micro]
        summary, sums = self.summary(t0, len(parts), every, total_loss, grad_norm, lr, sums)
        num_tokens = sum(lengths)
        out = {k: (v if k.endswith("max") else v / num_tokens) for k, v in sums.items()}
        return out | summary

    def summary(
        self,
        t0: float,
        updates: int,
        every: list[MicroBatch],
        total_loss: float,
        grad_norm: float,
        lr: float,
        sums: dict[str, float],
    ) -> tuple[dict[str, float], dict[str, float]]:
        """What every algorithm's step reports (loss, gradient norm and learning rate
        averaged over its ``updates``; micro-batches, padding, tokens and speed, tokens summed
        over ranks), and ``sums`` summed over ranks for the caller to normalise."""
        tokens = float(sum(mb.real_tokens for mb in every))
        if self.world > 1:
            total_loss, sums = self._reduce_metrics(total_loss, sums)
            counted = torch.tensor([tokens])
            dist.all_reduce(counted, op=dist.ReduceOp.SUM)
            tokens = counted.item()
        seconds = time.perf_counter() - t0
        out = {
            "loss": total_loss / updates,
            "grad_norm": grad_norm / updates,
            "lr": lr / updates,
            "updates": float(updates),
            "micro_batches": float(len(every)),
            "padding_frac": padding_fraction(every) if every else 0.0,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }
        return out, sums

    def _update(
        self,
        batch: TrainBatch,
        part: list[int],
        micro: list[MicroBatch],
        old: list[torch.Tensor] | None,
        sums: dict[str, float],
    ) -> tuple[float, float]:
        """One optimizer step on the mini-batch ``part`` (this rank trains ``micro``, its
        share), normalised by the mini-batch's counts; adds token-weighted metric sums to
        ``sums``. Returns this rank's loss and the global gradient norm before clipping."""
        num_sequences = len(part)
        num_tokens = sum(len(batch.samples[i].completion_ids) for i in part)
        total_loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        idle = self._idle_passes(len(micro))
        for j, mb in enumerate(micro):
            logps, entropy = self.policy(mb, batch.temperature)
            old_logps = logps.detach() if old is None else old[j]
            inp = self._loss_inputs(batch, mb, logps, old_logps, entropy, num_sequences, num_tokens)
            loss, metrics = policy_loss(self.cfg.loss.type, inp, self.loss_params)
            (loss * self.world if self.sharded else loss).backward()  # FSDP2 averages
            total_loss += float(loss.detach())
            n = len(mb.target_ids)
            for k, v in metrics.items():
                if k.endswith("max"):
                    sums[k] = max(sums.get(k, v), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * n
        if idle:  # passes that change no gradient, matching the other ranks' passes
            spare = self._spare(batch)
            for _ in range(idle):
                logps, _ = self.policy(spare, batch.temperature)
                (logps.sum() * 0.0).backward()
        return total_loss, self._step_optimizer()

    def _step_optimizer(self) -> float:
        """After the backward passes of an update: sum the gradients over ranks (replicate),
        clip their norm, step AdamW and the schedule; the norm before clipping."""
        if self.world > 1 and not self.sharded:
            self._all_reduce_grads()
        grad_norm: Any = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.max_grad_norm
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    @torch.no_grad()
    def _old_logprobs(
        self, batch: TrainBatch, updates: list[list[MicroBatch]]
    ) -> list[list[torch.Tensor]]:
        """Logprobs of every micro-batch of every update under the current (pre-update)
        weights, at the sampling temperature."""
        idle = self._idle_passes(sum(len(micro) for micro in updates))  # before any pass
        old = [[self.policy(mb, batch.temperature)[0] for mb in micro] for micro in updates]
        if idle:
            spare = self._spare(batch)
            for _ in range(idle):
                self.policy(spare, batch.temperature)
        return old

    def _idle_passes(self, passes: int) -> int:
        """Passes this rank must add so that every rank makes as many: FSDP2 runs its
        collectives per forward (and backward) pass. 0 unless sharded; a collective itself,
        so call it before the passes."""
        if not self.sharded:
            return 0
        most = torch.tensor([passes])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item()) - passes

    def _spare(self, batch: TrainBatch) -> MicroBatch:
        """A one-sample micro-batch for idle passes (its results are thrown away)."""
        (spare,) = self.layout(batch, [0])
        return spare

    def state_dict(self, master: bool = False) -> dict[str, torch.Tensor]:
        """The model's whole weights in the compute dtype (``trainer.dtype``): what the
        engines load and serve, so their checksums equal ``weights_checksum`` of this (the
        cast rounds to nearest as an engine's copy into its own parameters would). With
        ``master``, the parameters as trained (``trainer.master_dtype``). Under FSDP2 a
        collective every rank must call."""
        from torch.distributed.tensor import DTensor

        dtype = None if master else self.compute_dtype
        out = {}
        for k, v in self.model.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return out

    def checkpoint(self) -> dict[str, Any]:
        """This rank's share of the model and optimizer state, sharded (``get_state_dict``:
        FSDP2 shards as DTensors, replicated tensors otherwise), keyed by parameter name:
        what ``torch.distributed.checkpoint`` saves and loads (``trainer.checkpoint``).
        Nothing is gathered. The tensors are the live state: copy them to keep a snapshot."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optimizer": optim}
        if self.critic is not None:  # PPO: the critic goes with the policy
            state["critic"], state["critic_optimizer"] = get_state_dict(
                self.critic, self.critic_optimizer
            )
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Load what ``checkpoint`` returned, or the same layout filled by
        ``torch.distributed.checkpoint.load`` (whatever the sharding it was saved with)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        if self.critic is not None:
            if "critic" not in state:
                raise ValueError(
                    "this checkpoint holds no critic (it was not written by a PPO run): "
                    "resume it with the loss it was trained with"
                )
            set_state_dict(
                self.critic,
                self.critic_optimizer,
                model_state_dict=state["critic"],
                optim_state_dict=state["critic_optimizer"],
            )

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over ranks (the replicate path; FSDP2 reduces its own)."""
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:  # a rank whose share never touched this parameter
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def _reduce_metrics(
        self, total_loss: float, sums: dict[str, float]
    ) -> tuple[float, dict[str, float]]:
        """Sum the loss and metric sums over ranks (max for ``*max``)."""
        everyone: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(everyone, sorted(sums))  # a rank may have had no samples
        keys = sorted({k for ks in everyone for k in ks})
        sums = {k: sums.get(k, float("-inf") if k.endswith("max") else 0.0) for k in keys}
        added = torch.tensor([total_loss] + [sums[k] for k in keys if not k.endswith("max")])
        maxed = torch.tensor([sums[k] for k in keys if k.endswith("max")] or [0.0])
        dist.all_reduce(added, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        a, m = iter(added.tolist()[1:]), iter(maxed.tolist())
        return added[0].item(), {k: next(m) if k.endswith("max") else next(a) for k in keys}

    def _loss_inputs(
        self,
        batch: TrainBatch,
        mb: MicroBatch,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        entropy: torch.Tensor,
        num_sequences: int,
        num_tokens: int,
    ) -> LossInputs:
        samples = [batch.samples[i] for i in mb.sample_ids]
        dev = logps.device
        extra: dict[str, Any] = {}
        missing = any(s.engine_logprobs is None for s in samples)
        if self.loss_params.tis_cap is not None and missing:
            raise ValueError("loss.tis_cap is set but some samples carry no engine_logprobs")
        if not missing:  # TIS weights, and the trainer-engine gap as a metric
            extra["engine_logprobs"] = torch.tensor(
                [lp for s in samples for lp in s.engine_logprobs or []], device=dev
            )
        if self.ref_model is not None:
            with torch.no_grad(), self.policy.compute():  # the policy's own precision
                extra["ref_logprobs"], _ = micro_batch_logprobs(
                    self.ref_model, mb, self.cfg.logprob_chunk_size, batch.temperature
                )
        return LossInputs(
            logprobs=logps,
            old_logprobs=old_logps,
            advantages=torch.tensor(
                [s.advantage for s in samples], dtype=torch.float32, device=dev
            ),
            seq_ids=mb.seq_ids.to(dev),
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=batch.max_completion_length,
            entropy=entropy,
            **extra,
        )
