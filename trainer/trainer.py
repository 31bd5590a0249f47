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
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from trainer.config import TrainerConfig
from trainer.logprobs import micro_batch_logprobs
from trainer.loss import LossInputs, LossParams, policy_loss
from trainer.packing import MicroBatch, build_packed, build_padded, padding_fraction
from trainer.protocol import TrainBatch


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

    def layout(self, batch: TrainBatch) -> list[MicroBatch]:
        seqs = [(s.prompt_ids, s.completion_ids) for s in batch.samples]
        if self.cfg.layout == "packed":
            return build_packed(
                seqs, self.cfg.max_tokens_per_micro_batch, self.cfg.pack_row_tokens, self.pad_id
            )
        return build_padded(seqs, self.cfg.max_tokens_per_micro_batch, self.pad_id)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer update on ``batch``; returns metrics (token-weighted means)."""
        t0 = time.perf_counter()
        samples = batch.samples
        micro = self.layout(batch)
        num_tokens = sum(len(s.completion_ids) for s in samples)
        sums: dict[str, float] = {}
        total_loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for mb in micro:
            logps, entropy = micro_batch_logprobs(self.model, mb, self.cfg.logprob_chunk_size)
            inp = self._loss_inputs(batch, mb, logps, entropy, num_tokens)
            loss, metrics = policy_loss(self.cfg.loss.type, inp, self.loss_params)
            loss.backward()
            total_loss += float(loss.detach())
            n = len(mb.target_ids)
            for k, v in metrics.items():
                if k.endswith("max"):
                    sums[k] = max(sums.get(k, v), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * n
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
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
            padding_frac=padding_fraction(micro),
            tokens=float(sum(mb.real_tokens for mb in micro)),
            seconds=seconds,
        )
        out["tokens_per_s"] = out["tokens"] / seconds
        return out

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
