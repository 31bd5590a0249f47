"""PPO with a critic: pure functions on padded ``[B, T]`` per-token tensors.

Layout. ``B`` completions right-padded to ``T`` tokens; ``mask [B, T]`` is 1 on a
completion's tokens. Token ``t`` of a completion is the action, ``values[:, t]`` the
critic's estimate of the return from there (before emitting it).

- ``token_rewards``: the verifier's score on each completion's last token, minus
  ``kl_coef x (logp - ref_logp)`` on every token when the KL penalty is in the reward
  (InstructGPT, TRL's PPO).
- ``gae``: generalised advantage estimation (Schulman et al. 2016),
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambda A_{t+1}``, with
  ``V = 0`` after the last token (the episode ends there); ``returns = A + V``.
- ``masked_whiten``: advantages normalised over the batch's tokens (unbiased variance,
  as TRL's ``masked_whiten``).
- ``value_loss``: ``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``.
- ``policy_loss``: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, ``r = exp(logp - old)``.

Per-token losses are reduced by ``masked_mean``. The vectorised GAE against a direct
per-sequence loop of the published formulas: tests/trainer/test_ppo_math.py.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked positions (unbiased variance);
    ``shift_mean=False`` adds the mean back. Padding positions come out 0."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least 2 tokens; turn ppo.whiten_advantages off")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """``[B, T]`` rewards: ``scores [B]`` on each completion's last token, and with
    ``kl_coef > 0`` ``-kl_coef (logprobs - ref_logprobs)`` on every token."""
    if mask.dim() != 2 or scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [B] for mask [B, T], got {tuple(scores.shape)}")
    lengths = mask.sum(1).long()
    if (lengths == 0).any():
        raise ValueError("a completion has no tokens: drop empty completions first")
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if kl_coef > 0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs logprobs and ref_logprobs")
        rewards = rewards - kl_coef * (logprobs - ref_logprobs).to(scores.dtype) * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, lengths - 1] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[B, T]`` (0 on padding). Masks must be right-padded."""
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must share one [B, T] shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    steps = rewards.shape[1]
    advantages = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(steps)):
        following = v[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = r[:, t] + gamma * following - v[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * m
    return advantages, (advantages + v) * m


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (masked mean) and ``value/clip_frac``; ``clip=None``: unclipped."""
    loss = (values - returns) ** 2
    metrics: dict[str, float] = {}
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss_clipped = (clipped - returns) ** 2
        with torch.no_grad():
            metrics["value/clip_frac"] = float(masked_mean((loss_clipped > loss).float(), mask))
        loss = torch.max(loss, loss_clipped)
    return 0.5 * masked_mean(loss, mask), metrics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (masked mean over tokens) and ``clip/frac``, ``approx_kl``."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps, 1 + eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip/frac": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask)),
        }
    return loss, metrics


def to_padded(
    x: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat ``[N]`` token stream (each sequence's tokens contiguous and in order, as
    ``trainer.packing`` lays them) as ``[S, T]`` right-padded, and its mask."""
    counts = torch.bincount(seq_ids, minlength=num_sequences)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(x.shape[0], device=x.device) - starts[seq_ids]
    out = x.new_zeros(num_sequences, width)
    out[seq_ids, col] = x
    mask = torch.zeros(num_sequences, width, dtype=torch.bool, device=x.device)
    mask[seq_ids, col] = True
    return out, mask
