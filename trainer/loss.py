"""Policy-gradient losses for GRPO-family algorithms: pure functions on flat token tensors.

Layout. A micro-batch is a flat stream of ``N`` loss tokens (completion tokens
only) belonging to ``S`` sequences: ``seq_ids[n]`` says which sequence token
``n`` belongs to. The same layout serves padded batches (``x[mask]``) and packed
rows, so packing never changes the math. Normalisers (``num_sequences``,
``num_tokens``) are those of the whole optimizer step, so summing the losses of
all micro-batches gives exactly the loss of the full batch.

Losses are registered under the names of the config's ``loss.type`` Literal:

========  ==================  ===========================================
name      importance ratio    aggregation
========  ==================  ===========================================
grpo      per token           mean over each sequence, then over sequences
dr_grpo   per token           sum / (num_sequences * max_completion_length)
dapo      per token           sum / num_tokens (token-level mean)
gspo      per sequence        mean over each sequence, then over sequences
========  ==================  ===========================================

All share the clipped surrogate ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``,
optional truncated importance sampling (TIS) against the inference engine's
logprobs, and an optional k3 KL penalty to a reference model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LossInputs:
    """Tensors for one micro-batch. Shapes: ``N`` loss tokens, ``S`` sequences.

    logprobs: ``[N]`` current policy's logprobs of the sampled tokens (carries grad).
    old_logprobs: ``[N]`` logprobs of the policy that the ratio is taken against.
    advantages: ``[S]`` one advantage per sequence.
    seq_ids: ``[N]`` long, sequence index of each token, in ``[0, S)``.
    num_sequences: sequences in the whole optimizer step (normaliser).
    num_tokens: loss tokens in the whole optimizer step (normaliser).
    max_completion_length: the constant normaliser of Dr. GRPO.
    ref_logprobs: ``[N]`` reference-model logprobs, needed when ``kl_beta > 0``.
    engine_logprobs: ``[N]`` logprobs the inference engine reported, needed for TIS; when
        given, the gap to ``old_logprobs`` is reported (``engine/logprob_diff_*``).
    entropy: ``[N]`` per-token entropy, only reported as a metric.
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    seq_ids: torch.Tensor
    num_sequences: int
    num_tokens: int
    max_completion_length: int = 1
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    """Scalar knobs shared by every loss (the config's ``loss`` section, resolved)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.0
    tis_cap: float | None = None


LossFn = Callable[[LossInputs, LossParams], tuple[torch.Tensor, dict[str, float]]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Register ``fn(inputs, params) -> (scalar loss, metrics)`` under ``name``."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return wrap


def check_inputs(inp: LossInputs, params: LossParams) -> None:
    """Raise ``ValueError`` naming the offending tensor when inputs are inconsistent."""
    n = inp.logprobs.shape
    if inp.logprobs.dim() != 1 or n[0] == 0:
        raise ValueError(f"logprobs must be a non-empty 1-D tensor [N], got shape {tuple(n)}")
    for name in ("old_logprobs", "seq_ids", "ref_logprobs", "engine_logprobs", "entropy"):
        t = getattr(inp, name)
        if t is not None and t.shape != n:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(n)}: every per-token "
                "tensor must cover the same loss tokens"
            )
    if inp.advantages.dim() != 1:
        raise ValueError(f"advantages must be [num_sequences], got {tuple(inp.advantages.shape)}")
    s = inp.advantages.shape[0]
    if inp.seq_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_ids must be an integer tensor, got {inp.seq_ids.dtype}")
    if int(inp.seq_ids.min()) < 0 or int(inp.seq_ids.max()) >= s:
        raise ValueError(
            f"seq_ids must lie in [0, {s}) for {s} advantages, got range "
            f"[{int(inp.seq_ids.min())}, {int(inp.seq_ids.max())}]"
        )
    if torch.bincount(inp.seq_ids, minlength=s).eq(0).any():
        raise ValueError("a sequence has no loss tokens: drop empty completions before the loss")
    for name in ("logprobs", "old_logprobs", "advantages"):
        if not torch.isfinite(getattr(inp, name)).all():
            raise ValueError(f"{name} contains NaN or inf")
    if inp.num_sequences < s or inp.num_tokens < n[0]:
        raise ValueError(
            f"step normalisers smaller than the micro-batch: num_sequences={inp.num_sequences} "
            f"(micro-batch has {s}), num_tokens={inp.num_tokens} (micro-batch has {n[0]})"
        )
    if params.kl_beta > 0 and inp.ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs; set loss.kl_beta = 0 or give a reference")
    if params.tis_cap is not None and inp.engine_logprobs is None:
        raise ValueError("tis_cap is set but engine_logprobs is missing; unset loss.tis_cap")


def segment_mean(x: torch.Tensor, seq_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[S]`` mean of ``x [N]`` over the tokens of each sequence."""
    sums = x.new_zeros(num_segments).index_add(0, seq_ids, x)
    counts = torch.bincount(seq_ids, minlength=num_segments).to(x.dtype)
    return sums / counts.clamp(min=1)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean())


def clipped_surrogate(
    inp: LossInputs, params: LossParams, sequence_level: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss ``[N]`` (before aggregation) and its metrics."""
    check_inputs(inp, params)
    s = inp.advantages.shape[0]
    log_ratio = inp.logprobs - inp.old_logprobs
    if sequence_level:
        log_ratio = segment_mean(log_ratio, inp.seq_ids, s)[inp.seq_ids]
    ratio = torch.exp(log_ratio)
    adv = inp.advantages[inp.seq_ids]
    clipped = torch.clamp(ratio, 1 - params.eps_low, 1 + params.eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)

    metrics: dict[str, float] = {}
    if inp.engine_logprobs is not None:  # trainer vs engine on the same policy version
        gap = (inp.old_logprobs - inp.engine_logprobs).detach().abs()
        metrics["engine/logprob_diff_mean"] = _mean(gap)
        metrics["engine/logprob_diff_max"] = float(gap.max())
    if params.tis_cap is not None:
        assert inp.engine_logprobs is not None
        raw = torch.exp(inp.old_logprobs - inp.engine_logprobs).detach()
        weight = raw.clamp(max=params.tis_cap)
        per_token = per_token * weight
        metrics["tis/weight_mean"] = _mean(weight)
        metrics["tis/truncated_frac"] = _mean(raw > params.tis_cap)
    if params.kl_beta > 0:
        assert inp.ref_logprobs is not None
        d = inp.ref_logprobs - inp.logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + params.kl_beta * kl
        metrics["kl_ref"] = _mean(kl.detach())

    with torch.no_grad():
        r = ratio.detach()
        lr = log_ratio.detach()
        low = (r < 1 - params.eps_low) & (adv < 0)
        high = (r > 1 + params.eps_high) & (adv > 0)
        metrics["clip/low_frac"] = _mean(low)
        metrics["clip/high_frac"] = _mean(high)
        metrics["clip/frac"] = _mean(low | high)  # tokens whose gradient the clip zeroes
        metrics["ratio/mean"] = _mean(r)
        metrics["ratio/max"] = float(r.max())
        metrics["approx_kl"] = _mean(torch.expm1(lr) - lr)
        if inp.entropy is not None:
            metrics["entropy"] = _mean(inp.entropy)
    return per_token, metrics


def _sequence_mean_aggregate(per_token: torch.Tensor, inp: LossInputs) -> torch.Tensor:
    s = inp.advantages.shape[0]
    return segment_mean(per_token, inp.seq_ids, s).sum() / inp.num_sequences


@register_loss("grpo")
def grpo_loss(inp: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: token ratios, mean over each sequence's tokens, then over sequences."""
    per_token, metrics = clipped_surrogate(inp, params, sequence_level=False)
    return _sequence_mean_aggregate(per_token, inp), metrics


@register_loss("dr_grpo")
def dr_grpo_loss(inp: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO: token ratios, sum divided by a constant (sequences x max completion length)."""
    per_token, metrics = clipped_surrogate(inp, params, sequence_level=False)
    return per_token.sum() / (inp.num_sequences * inp.max_completion_length), metrics


@register_loss("dapo")
def dapo_loss(inp: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO: token ratios with clip-higher (eps_high > eps_low), token-level mean."""
    per_token, metrics = clipped_surrogate(inp, params, sequence_level=False)
    return per_token.sum() / inp.num_tokens, metrics


@register_loss("gspo")
def gspo_loss(inp: LossInputs, params: LossParams) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: one ratio per sequence (geometric mean of token ratios), sequence-mean aggregation."""
    per_token, metrics = clipped_surrogate(inp, params, sequence_level=True)
    return _sequence_mean_aggregate(per_token, inp), metrics


def policy_loss(
    kind: str, inp: LossInputs, params: LossParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the loss registered as ``kind`` (the config's ``loss.type``)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss type {kind!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[kind](inp, params)
