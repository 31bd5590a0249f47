"""Group-relative advantages: pure functions on reward tensors.

Rewards arrive as a dense ``[num_groups, group_size]`` tensor (G completions of
one prompt per row). Every estimator returns advantages of the same shape and a
``[num_groups]`` mask of zero-variance groups (all G rewards equal), which carry
no learning signal and which dynamic sampling drops and refills.

Estimators are registered by the name the config's ``advantage.type`` Literal
uses, so adding one is a function plus a decorator, never an if/elif chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Advantages:
    """What an estimator returns.

    values: ``[num_groups, group_size]`` float advantages.
    zero_variance: ``[num_groups]`` bool, True where every reward in the group is equal.
    """

    values: torch.Tensor
    zero_variance: torch.Tensor


AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator ``fn(rewards [N, G], **options) -> advantages [N, G]``."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def check_rewards(rewards: torch.Tensor, min_group_size: int = 1) -> None:
    """Raise ``ValueError`` naming what is wrong with a reward tensor."""
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [num_groups, group_size], got {tuple(rewards.shape)}; "
            "reshape the flat reward list with .view(-1, group_size)"
        )
    num_groups, group_size = rewards.shape
    if num_groups == 0 or group_size == 0:
        raise ValueError(
            f"empty groups: rewards has shape {tuple(rewards.shape)}; every prompt needs "
            "at least one scored completion before advantages can be computed"
        )
    if group_size < min_group_size:
        raise ValueError(
            f"this estimator needs group_size >= {min_group_size}, got {group_size}; "
            "raise rollout.group_size"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got dtype {rewards.dtype}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        groups = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        raise ValueError(
            f"rewards contain NaN or inf in groups {groups[:10]}: a reward function returned a "
            "non-finite score; fix the environment or report the item as an error result"
        )


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: True where all rewards of a group are exactly equal."""
    return rewards.max(dim=1).values == rewards.min(dim=1).values


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: ``r - mean_group(r)``, divided by ``std_group(r) + eps`` when ``scale_by_std``.

    Dr. GRPO sets ``scale_by_std=False`` (the std division biases towards easy or
    hard prompts). The std is the unbiased one, as TRL computes it.
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centered
    if rewards.shape[1] < 2:
        raise ValueError("scale_by_std needs group_size >= 2; set advantage.scale_by_std = false")
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, **_: object) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* G-1 rewards of its group."""
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (a leave-one-out baseline); raise it")
    total = rewards.sum(dim=1, keepdim=True)
    return rewards - (total - rewards) / (group_size - 1)


def compute_advantages(
    rewards: torch.Tensor, kind: str = "grpo", scale_by_std: bool = True, eps: float = 1e-4
) -> Advantages:
    """Compute advantages with the estimator registered as ``kind``.

    rewards: ``[num_groups, group_size]`` float, finite.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage type {kind!r}; choose one of {sorted(ADVANTAGES)}")
    check_rewards(rewards)
    values = ADVANTAGES[kind](rewards, scale_by_std=scale_by_std, eps=eps)
    return Advantages(values=values, zero_variance=zero_variance_groups(rewards))
