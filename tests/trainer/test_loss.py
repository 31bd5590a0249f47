"""Policy losses: parity with TRL's GRPOTrainer formulas, behaviour and input errors.

Parity: the same random tensors go through ``GRPOTrainer._compute_loss`` (TRL
1.x, called unbound on a namespace holding the attributes it reads, with the
model forward replaced by the given logprobs, since the loss formula is what is
compared) and through ``trainer.loss``; losses and gradients must agree to 1e-6.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainer.loss import LossInputs, LossParams, policy_loss

B, T = 6, 9

# (our loss, TRL loss_type, TRL importance_sampling_level)
PARITY = [
    ("grpo", "grpo", "token"),
    ("dr_grpo", "dr_grpo", "token"),
    ("dapo", "dapo", "token"),
    ("gspo", "grpo", "sequence"),
]


def random_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):
        mask[b, : int(torch.randint(1, T + 1, (1,), generator=g))] = 1
    logps = (-torch.rand(B, T, generator=g) * 3).double()
    old = logps + 0.3 * torch.randn(B, T, generator=g).double()
    ref = logps + 0.2 * torch.randn(B, T, generator=g).double()
    engine = old + 0.2 * torch.randn(B, T, generator=g).double()
    adv = torch.randn(B, generator=g).double()
    return mask, logps, old, ref, engine, adv


def trl_loss(loss_type, level, mask, logps, old, ref, is_ratio, adv, params):
    from trl.trainer.grpo_trainer import GRPOTrainer

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=params.kl_beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=params.eps_low,
        epsilon_high=params.eps_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        accelerator=SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x
        ),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "importance_sampling_ratio": is_ratio,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(fake, None, inputs)


def ours(kind, mask, logps, old, ref, engine, adv, params):
    m = mask.bool()
    seq_ids = torch.arange(B)[:, None].expand(B, T)[m]
    inp = LossInputs(
        logprobs=logps[m],
        old_logprobs=old[m],
        advantages=adv,
        seq_ids=seq_ids,
        num_sequences=B,
        num_tokens=int(mask.sum()),
        max_completion_length=T,
        ref_logprobs=ref[m] if params.kl_beta else None,
        engine_logprobs=engine[m] if params.tis_cap else None,
    )
    return policy_loss(kind, inp, params)


@pytest.mark.parametrize(("kind", "trl_type", "level"), PARITY)
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
@pytest.mark.parametrize("tis_cap", [None, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl_loss_and_gradients(kind, trl_type, level, kl_beta, tis_cap, seed):
    mask, logps, old, ref, engine, adv = random_batch(seed)
    eps = (3e-4, 4e-4) if kind == "gspo" else (0.2, 0.28)
    params = LossParams(eps_low=eps[0], eps_high=eps[1], kl_beta=kl_beta, tis_cap=tis_cap)
    # TRL's "token_truncate" vLLM importance-sampling weight, computed as TRL does.
    is_ratio = None
    if tis_cap is not None:
        is_ratio = torch.clamp(torch.exp((old - engine) * mask), max=tis_cap)

    a = logps.clone().requires_grad_(True)
    loss_trl = trl_loss(trl_type, level, mask, a, old, ref, is_ratio, adv, params)
    loss_trl.backward()

    b = logps.clone().requires_grad_(True)
    loss_ours, _ = ours(kind, mask, b, old, ref, engine, adv, params)
    loss_ours.backward()

    assert abs(float(loss_trl) - float(loss_ours)) < 1e-6
    assert torch.allclose(a.grad * mask, b.grad * mask, atol=1e-6)


def test_positive_advantage_gradient_raises_logprob():
    logps = torch.full((4,), -1.0, requires_grad=True)
    inp = LossInputs(
        logprobs=logps,
        old_logprobs=logps.detach(),
        advantages=torch.tensor([1.0, -1.0]),
        seq_ids=torch.tensor([0, 0, 1, 1]),
        num_sequences=2,
        num_tokens=4,
    )
    loss, metrics = policy_loss("grpo", inp, LossParams())
    loss.backward()
    # gradient descent moves logprobs against the gradient
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()
    assert metrics["ratio/mean"] == pytest.approx(1.0)
    assert metrics["clip/low_frac"] == 0.0


def test_clip_metrics_count_clipped_tokens():
    logps = torch.log(torch.tensor([2.0, 1.0, 0.5, 1.0]))
    inp = LossInputs(
        logprobs=logps,
        old_logprobs=torch.zeros(4),
        advantages=torch.tensor([1.0, -1.0]),
        seq_ids=torch.tensor([0, 0, 1, 1]),
        num_sequences=2,
        num_tokens=4,
    )
    _, metrics = policy_loss("dapo", inp, LossParams(eps_low=0.2, eps_high=0.28))
    assert metrics["clip/high_frac"] == pytest.approx(0.25)
    assert metrics["clip/low_frac"] == pytest.approx(0.25)
    assert metrics["ratio/max"] == pytest.approx(2.0)


def base_inputs(**override):
    kw = dict(
        logprobs=torch.zeros(4),
        old_logprobs=torch.zeros(4),
        advantages=torch.tensor([1.0, -1.0]),
        seq_ids=torch.tensor([0, 0, 1, 1]),
        num_sequences=2,
        num_tokens=4,
    )
    kw.update(override)
    return LossInputs(**kw)


@pytest.mark.parametrize(
    ("override", "params", "message"),
    [
        ({"old_logprobs": torch.zeros(3)}, LossParams(), "old_logprobs has shape"),
        ({"logprobs": torch.zeros(0), "old_logprobs": torch.zeros(0)}, LossParams(), "non-empty"),
        ({"seq_ids": torch.tensor([0, 0, 2, 2])}, LossParams(), "seq_ids must lie in"),
        ({"seq_ids": torch.tensor([0, 0, 0, 0])}, LossParams(), "no loss tokens"),
        ({"advantages": torch.tensor([float("nan"), 1.0])}, LossParams(), "advantages contains"),
        ({}, LossParams(kl_beta=0.1), "needs ref_logprobs"),
        ({}, LossParams(tis_cap=2.0), "engine_logprobs is missing"),
        ({"num_tokens": 2}, LossParams(), "normalisers smaller"),
    ],
)
def test_bad_inputs_raise_clear_errors(override, params, message):
    with pytest.raises(ValueError, match=message):
        policy_loss("grpo", base_inputs(**override), params)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        policy_loss("ppo2", base_inputs(), LossParams())
