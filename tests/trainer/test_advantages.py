"""Advantage estimators: values, zero-variance flags and input errors."""

import pytest
import torch

from trainer.advantages import compute_advantages


def test_grpo_centres_and_scales_per_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = compute_advantages(r, "grpo").values
    assert torch.allclose(adv.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv.std(dim=1), torch.ones(2), atol=1e-3)
    assert adv[1, 3] > 0 > adv[1, 0]


def test_dr_grpo_drops_std_scaling():
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    adv = compute_advantages(r, "grpo", scale_by_std=False).values
    assert torch.allclose(adv, torch.tensor([[-0.25, -0.25, -0.25, 0.75]]))


def test_rloo_is_leave_one_out():
    r = torch.tensor([[1.0, 0.0, 0.5]])
    adv = compute_advantages(r, "rloo").values
    assert torch.allclose(adv, torch.tensor([[0.75, -0.75, 0.0]]))


def test_zero_variance_groups_are_flagged_not_dropped():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    out = compute_advantages(r, "grpo")
    assert out.zero_variance.tolist() == [True, False, True]
    assert out.values.shape == r.shape
    assert torch.all(out.values[0] == 0)


@pytest.mark.parametrize(
    ("rewards", "kind", "message"),
    [
        (torch.zeros(0, 4), "grpo", "empty groups"),
        (torch.zeros(3), "grpo", "shape [num_groups, group_size]"),
        (torch.tensor([[1.0, float("nan")]]), "grpo", "NaN or inf in groups [0]"),
        (torch.tensor([[1.0], [0.0]]), "rloo", "group_size >= 2"),
        (torch.tensor([[1.0, 0.0]]), "ppo", "unknown advantage type 'ppo'"),
    ],
)
def test_bad_rewards_raise_clear_errors(rewards, kind, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compute_advantages(rewards, kind)
