"""Direct preference optimisation (DPO) losses: pure functions on per-pair sequence logprobs.

A pair is a prompt with a *chosen* and a *rejected* completion. Each side's sequence
logprob is the sum of its completion tokens' logprobs, under the policy (with grad) and
under a frozen reference model (the initial policy). With the log ratios
``c = logp_chosen - ref_chosen`` and ``r = logp_rejected - ref_rejected``, ``d = c - r``:

=========  ===============================================================
name       per-pair loss
=========  ===============================================================
sigmoid    ``-(1 - ls) logsigmoid(beta d) - ls logsigmoid(-beta d)`` (DPO; ``ls`` > 0 is
           conservative DPO's label smoothing)
ipo        ``(c / n_c - r / n_r - 1 / (2 beta))^2`` with ``n`` the completion's tokens (IPO,
           length-normalised as TRL does)
hinge      ``relu(1 - beta d)`` (SLiC)
=========  ===============================================================

The batch loss is the sum over pairs divided by ``num_pairs``, the pairs of the whole
optimizer step, so micro-batches and ranks add up to the full batch's mean. Parity with
TRL's ``DPOTrainer`` on the same inputs: tests/trainer/test_dpo_math.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOInputs:
    """Shapes: ``P`` pairs.

    chosen_logps, rejected_logps: ``[P]`` policy sequence logprobs (carry grad).
    ref_chosen_logps, ref_rejected_logps: ``[P]`` reference sequence logprobs (no grad).
    chosen_tokens, rejected_tokens: ``[P]`` completion lengths in tokens (IPO's normaliser).
    num_pairs: pairs in the whole optimizer step (the mean's denominator).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    num_pairs: int


@dataclass(frozen=True)
class DPOParams:
    """The config's ``trainer.loss`` (``type = "dpo"``), resolved."""

    beta: float = 0.1
    label_smoothing: float = 0.0


PairLossFn = Callable[[torch.Tensor, torch.Tensor, DPOInputs, DPOParams], torch.Tensor]
DPO_LOSSES: dict[str, PairLossFn] = {}


def register_dpo_loss(name: str) -> Callable[[PairLossFn], PairLossFn]:
    """Register ``fn(chosen_logratio [P], rejected_logratio [P], inputs, params) -> [P]``."""

    def wrap(fn: PairLossFn) -> PairLossFn:
        DPO_LOSSES[name] = fn
        return fn

    return wrap


@register_dpo_loss("sigmoid")
def sigmoid_loss(c: torch.Tensor, r: torch.Tensor, _: DPOInputs, p: DPOParams) -> torch.Tensor:
    z = p.beta * (c - r)
    return -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)


@register_dpo_loss("ipo")
def ipo_loss(c: torch.Tensor, r: torch.Tensor, inp: DPOInputs, p: DPOParams) -> torch.Tensor:
    delta = c / inp.chosen_tokens.clamp(min=1) - r / inp.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * p.beta)) ** 2


@register_dpo_loss("hinge")
def hinge_loss(c: torch.Tensor, r: torch.Tensor, _: DPOInputs, p: DPOParams) -> torch.Tensor:
    return torch.relu(1 - p.beta * (c - r))


def check_inputs(inp: DPOInputs) -> None:
    """Raise ``ValueError`` naming the tensor that is inconsistent."""
    shape = inp.chosen_logps.shape
    if inp.chosen_logps.dim() != 1 or shape[0] == 0:
        raise ValueError(f"chosen_logps must be a non-empty [P] tensor, got {tuple(shape)}")
    for name in (
        "rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_tokens",
        "rejected_tokens",
    ):
        t = getattr(inp, name)
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, chosen_logps {tuple(shape)}")
    if inp.num_pairs < shape[0]:
        raise ValueError(f"num_pairs={inp.num_pairs} is less than the {shape[0]} pairs given")


def dpo_loss(kind: str, inp: DPOInputs, params: DPOParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss registered as ``kind`` summed over the pairs / ``num_pairs``, and metric *sums*
    over these pairs (divide by the step's pairs): ``dpo/margin`` (``beta d``, the implicit
    reward margin), ``dpo/accuracy`` (pairs with ``d > 0``), ``dpo/chosen_reward`` and
    ``dpo/rejected_reward`` (``beta c``, ``beta r``)."""
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; choose one of {sorted(DPO_LOSSES)}")
    check_inputs(inp)
    c = inp.chosen_logps - inp.ref_chosen_logps
    r = inp.rejected_logps - inp.ref_rejected_logps
    per_pair = DPO_LOSSES[kind](c, r, inp, params)
    with torch.no_grad():
        b = params.beta
        metrics = {
            "dpo/margin": float((b * (c - r)).sum()),
            "dpo/accuracy": float((c > r).float().sum()),
            "dpo/chosen_reward": float((b * c).sum()),
            "dpo/rejected_reward": float((b * r).sum()),
        }
    return per_pair.sum() / inp.num_pairs, metrics
