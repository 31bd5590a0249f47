"""The single-process training step: scored samples in, one optimizer update out.

``Trainer`` is a plain class (unit tests construct it directly; the Ray actor
group wraps it later). One ``train_step``:

1. lays the samples out in micro-batches (packed or padded, ``trainer.packing``),
2. per micro-batch: forward to the final hidden states, chunked per-token
   logprobs of the completion tokens, the configured policy loss normalised by
   the whole step's sequence/token counts, backward (gradient accumulation),
3. clips the gradient norm and steps AdamW.

With one update per batch the "old" policy is the current one, so the ratio is
exactly 1 and ``old_logprobs`` are the detached current logprobs.

Data parallel (``torch.distributed`` initialised, e.g. by the Ray trainer group):
every rank receives the whole batch, takes its share of the samples (balanced by
tokens, ``shard``), normalises its loss by the *whole* batch's counts and, after
its backward passes, all-reduces (sums) the gradients. The update is therefore
the single-process update on the whole batch, whatever the number of ranks
(tested); metrics are summed across ranks the same way.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainerConfig
from trainer.logprobs import PolicyLogprobs, micro_batch_logprobs
from trainer.loss import LossInputs, LossParams, policy_loss
from trainer.packing import MicroBatch, build_packed, build_padded, padding_fraction
from trainer.protocol import TrainBatch


def shard(lengths: list[int], rank: int, world: int) -> list[int]:
    """Indices of the samples ``rank`` trains on: longest first to the least-loaded rank."""
    load = [0] * world
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += lengths[i]
        if r == rank:
            mine.append(i)
    return sorted(mine)


def fsdp2(policy: PolicyLogprobs) -> None:
    """Shard ``policy`` over the default process group: one FSDP2 unit per decoder layer
    (the model's ``_no_split_modules``), the rest in the root; gradients are summed over
    ranks, not averaged, like the replicate path (whole-batch normalisers do the mean): FSDP2
    averages, so the trainer scales each rank's loss by the world size (a divide factor of 1
    would need PREMUL_SUM, which gloo lacks)."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(policy.model, "_no_split_modules", None) or ())
    if not layers:
        raise ValueError(
            f"{type(policy.model).__name__} names no decoder layer class (_no_split_modules); "
            "FSDP2 needs one unit per layer: use trainer.sharding = 'replicate'"
        )
    for m in list(policy.model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m)
    fully_shard(policy)


class Trainer:
    """Owns the policy model, its optimiser and (when ``kl_beta > 0``) a frozen reference."""

    def __init__(self, model: nn.Module, cfg: TrainerConfig, pad_id: int = 0) -> None:
        self.cfg = cfg
        self.model = model
        self.pad_id = pad_id
        torch.manual_seed(cfg.seed)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        model.train()
        self.ref_model = None
        if cfg.loss.kl_beta > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.policy = PolicyLogprobs(model, cfg.logprob_chunk_size)
        self.sharded = cfg.sharding == "fsdp2" and self.world > 1
        if self.sharded:
            fsdp2(self.policy)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
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
        """One optimizer update on ``batch``; returns metrics (token-weighted means)."""
        t0 = time.perf_counter()
        samples = batch.samples
        mine = shard([len(s.completion_ids) for s in samples], self.rank, self.world)
        micro = self.layout(batch, mine)
        num_tokens = sum(len(s.completion_ids) for s in samples)
        sums: dict[str, float] = {}
        total_loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        idle = 0
        if self.sharded:  # FSDP2's collectives run per pass: every rank makes as many
            most = torch.tensor([len(micro)])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            idle = int(most.item()) - len(micro)
        for mb in micro:
            logps, entropy = self.policy(mb)
            inp = self._loss_inputs(batch, mb, logps, entropy, num_tokens)
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
            (spare,) = self.layout(batch, [0])
            for _ in range(idle):
                logps, _ = self.policy(spare)
                (logps.sum() * 0.0).backward()
        tokens = float(sum(mb.real_tokens for mb in micro))
        if self.world > 1:
            total_loss, sums = self._all_reduce(total_loss, sums, grads=not self.sharded)
            counted = torch.tensor([tokens])
            dist.all_reduce(counted, op=dist.ReduceOp.SUM)
            tokens = counted.item()
        grad_norm: Any = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.max_grad_norm
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        seconds = time.perf_counter() - t0
        out = {k: (v if k.endswith("max") else v / num_tokens) for k, v in sums.items()}
        out.update(
            loss=total_loss,
            grad_norm=float(grad_norm),
            lr=float(self.scheduler.get_last_lr()[0]),
            micro_batches=float(len(micro)),
            padding_frac=padding_fraction(micro) if micro else 0.0,
            tokens=tokens,
            seconds=seconds,
        )
        out["tokens_per_s"] = out["tokens"] / seconds
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole weights; under FSDP2 a collective every rank must call."""
        from torch.distributed.tensor import DTensor

        return {
            k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in self.model.state_dict().items()
        }

    def checkpoint(self) -> dict[str, Any]:
        """Model, optimizer and scheduler state, whole (FSDP2: gathered on rank 0 only, a
        collective); loadable by ``restore`` whatever the number of ranks."""
        if not self.sharded:
            return {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optim = get_state_dict(self.policy, self.optimizer, options=opts)
        return {"model": model, "optimizer": optim, "scheduler": self.scheduler.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Load what ``checkpoint`` returned (every rank loads the whole state)."""
        if not self.sharded:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.policy,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        self.scheduler.load_state_dict(state["scheduler"])

    def _all_reduce(
        self, total_loss: float, sums: dict[str, float], grads: bool = True
    ) -> tuple[float, dict[str, float]]:
        """Sum gradients (unless FSDP2 reduced them) and metric sums (max for ``*max``)."""
        for p in self.model.parameters() if grads else ():
            if p.requires_grad:
                if p.grad is None:  # a rank whose share never touched this parameter
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
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
        entropy: torch.Tensor,
        num_tokens: int,
    ) -> LossInputs:
        samples = [batch.samples[i] for i in mb.sample_ids]
        dev = logps.device
        extra: dict[str, Any] = {}
        if self.loss_params.tis_cap is not None:
            if any(s.engine_logprobs is None for s in samples):
                raise ValueError("loss.tis_cap is set but some samples carry no engine_logprobs")
            extra["engine_logprobs"] = torch.tensor(
                [lp for s in samples for lp in s.engine_logprobs or []], device=dev
            )
        if self.ref_model is not None:
            with torch.no_grad():
                extra["ref_logprobs"], _ = micro_batch_logprobs(
                    self.ref_model, mb, self.cfg.logprob_chunk_size
                )
        return LossInputs(
            logprobs=logps,
            old_logprobs=logps.detach(),
            advantages=torch.tensor(
                [s.advantage for s in samples], dtype=torch.float32, device=dev
            ),
            seq_ids=mb.seq_ids.to(dev),
            num_sequences=len(batch.samples),
            num_tokens=num_tokens,
            max_completion_length=batch.max_completion_length,
            entropy=entropy,
            **extra,
        )
