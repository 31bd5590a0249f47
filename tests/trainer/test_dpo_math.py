"""DPO losses (trainer/dpo.py) against TRL's ``DPOTrainer`` on the same inputs, to 1e-6.

TRL (1.16) computes the DPO loss inside ``DPOTrainer._compute_loss``, after a model
forward; there is no function of logprobs alone. The test calls that method unbound, on
an object holding only the attributes it reads, with a "model" that returns fixed
per-token logprobs (the only thing TRL takes from its forward for the loss) and the
reference logprobs precomputed, as TRL's ``precompute_ref_log_probs`` passes them. Every
line of TRL's loss math then runs unchanged on our numbers.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainer.dpo import DPOInputs, DPOParams, dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _Logprobs(torch.nn.Module):
    """Stands in for TRL's fused-LM-head forward: returns the given per-token logprobs."""

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, **_: object) -> SimpleNamespace:
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def _trl_loss(
    kind: str,
    beta: float,
    smoothing: float,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    ref: torch.Tensor,
) -> float:
    """TRL's loss on a batch laid out as TRL lays it: [chosen..., rejected...] rows."""
    shift = mask[:, 1:].float()
    model = _Logprobs(tokens * shift).train()
    me = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[kind],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    p = ref.shape[0] // 2
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:p],
        "ref_rejected_logps": ref[p:],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(me, model, inputs, return_outputs=False)
    return float(loss)


def _batch(pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token logprobs [2P, L-1], completion mask [2P, L] (prompt 3 tokens, completions
    of 1..8 tokens, right-padded) and reference sequence logprobs [2P]."""
    g = torch.Generator().manual_seed(seed)
    width = 3 + 8
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        n = int(torch.randint(1, 9, (1,), generator=g))
        mask[row, 3 : 3 + n] = 1
    tokens = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 12
    return tokens, mask, ref


def _ours(kind: str, beta: float, smoothing: float, tokens, mask, ref) -> float:
    shift = mask[:, 1:]
    logps = (tokens * shift).sum(1)
    lengths = shift.sum(1)
    p = ref.shape[0] // 2
    inp = DPOInputs(logps[:p], logps[p:], ref[:p], ref[p:], lengths[:p], lengths[p:], p)
    loss, _ = dpo_loss(kind, inp, DPOParams(beta=beta, label_smoothing=smoothing))
    return float(loss)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_losses_match_trl(kind: str, beta: float) -> None:
    for seed in range(5):
        tokens, mask, ref = _batch(pairs=6, seed=seed)
        theirs = _trl_loss(kind, beta, 0.0, tokens, mask, ref)
        assert _ours(kind, beta, 0.0, tokens, mask, ref) == pytest.approx(theirs, abs=1e-6)


def test_label_smoothing_matches_trl_conservative_dpo() -> None:
    """TRL 1.16's sigmoid loss has no label smoothing; its ``aot`` loss with one pair per batch
    (sorting one number changes nothing) is conservative DPO's smoothed sigmoid."""
    for seed in range(8):
        tokens, mask, ref = _batch(pairs=1, seed=seed)
        theirs = _trl_loss("aot", 0.1, 0.2, tokens, mask, ref)
        assert _ours("sigmoid", 0.1, 0.2, tokens, mask, ref) == pytest.approx(theirs, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down() -> None:
    c = torch.tensor([-5.0, -4.0], requires_grad=True)
    r = torch.tensor([-5.0, -6.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0])
    n = torch.tensor([4, 4])
    for kind in ("sigmoid", "ipo", "hinge"):
        c.grad = r.grad = None
        loss, metrics = dpo_loss(kind, DPOInputs(c, r, ref, ref, n, n, 2), DPOParams(beta=0.1))
        loss.backward()
        assert c.grad is not None and r.grad is not None
        assert (c.grad < 0).all() and (r.grad > 0).all(), kind
        assert metrics["dpo/accuracy"] == 1.0  # only the second pair prefers chosen


def test_dpo_refuses_mismatched_shapes() -> None:
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        dpo_loss("sigmoid", DPOInputs(a, torch.zeros(2), a, a, a, a, 3), DPOParams())
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss("kto", DPOInputs(a, a, a, a, a, a, 3), DPOParams())
