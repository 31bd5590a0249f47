"""PPO math (trainer/ppo.py) against the published formulas, to 1e-6.

TRL 1.16 ships no PPO trainer any more (its GAE/value code went with PPOTrainer), so the
reference here is an independent, deliberately naive implementation: plain Python floats,
one completion at a time, written from Schulman et al. (2016) for GAE, and the PPO paper /
TRL's former PPOTrainer (masked_whiten with the unbiased variance, value clipping
``clip(V, V_old - c, V_old + c)``, ``0.5 x`` max of squared errors, masked means) for
the rest. The vectorised functions must give the same numbers.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from trainer.ppo import (
    gae,
    masked_whiten,
    policy_loss,
    to_padded,
    token_rewards,
    value_loss,
)


def _ragged(seed: int, batch: int = 5, longest: int = 9):
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, longest) for _ in range(batch)]

    def seqs():
        return [[rnd.uniform(-2, 2) for _ in range(n)] for n in lengths]

    return rnd, lengths, seqs


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0."""
    n = len(rewards)
    deltas = [
        rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)
    ]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_the_published_formula(gamma: float, lam: float) -> None:
    for seed in range(6):
        _, lengths, seqs = _ragged(seed)
        rewards, values = seqs(), seqs()
        width = max(lengths)
        adv, ret = gae(_pad(rewards, width), _pad(values, width), _mask(lengths, width), gamma, lam)
        for i in range(len(lengths)):
            a_ref, r_ref = reference_gae(rewards[i], values[i], gamma, lam)
            n = lengths[i]
            assert adv[i, :n].tolist() == pytest.approx(a_ref, abs=1e-6)
            assert ret[i, :n].tolist() == pytest.approx(r_ref, abs=1e-6)
            assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_token_rewards_score_on_last_token_kl_on_every_token() -> None:
    for seed in range(4):
        rnd, lengths, seqs = _ragged(seed)
        lp, ref = seqs(), seqs()
        scores = [rnd.random() for _ in lengths]
        width = max(lengths)
        out = token_rewards(
            torch.tensor(scores, dtype=torch.float64),
            _mask(lengths, width),
            _pad(lp, width),
            _pad(ref, width),
            kl_coef=0.05,
        )
        for i, n in enumerate(lengths):
            expect = [-0.05 * (lp[i][t] - ref[i][t]) for t in range(n)]
            expect[-1] += scores[i]
            assert out[i, :n].tolist() == pytest.approx(expect, abs=1e-6)
            assert out[i, n:].abs().sum() == 0


def test_whiten_matches_the_formula() -> None:
    for seed in range(4):
        _, lengths, seqs = _ragged(seed)
        x = seqs()
        flat = [v for row in x for v in row]
        mean = sum(flat) / len(flat)
        var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
        width = max(lengths)
        out = masked_whiten(_pad(x, width), _mask(lengths, width))
        for i, n in enumerate(lengths):
            expect = [(v - mean) / math.sqrt(var + 1e-8) for v in x[i]]
            assert out[i, :n].tolist() == pytest.approx(expect, abs=1e-6)
        kept = masked_whiten(_pad(x, width), _mask(lengths, width), shift_mean=False)
        assert kept[0, 0].item() == pytest.approx(out[0, 0].item() + mean, abs=1e-6)


def test_value_and_policy_losses_match_the_formulas() -> None:
    for seed in range(6):
        _, lengths, seqs = _ragged(seed)
        v, v_old, ret, lp, old, adv = (seqs() for _ in range(6))
        width, clip, eps = max(lengths), 0.2, 0.2
        m = _mask(lengths, width)
        vl, vm = value_loss(_pad(v, width), _pad(v_old, width), _pad(ret, width), m, clip)
        pl, pm = policy_loss(_pad(lp, width), _pad(old, width), _pad(adv, width), m, eps)
        vals, pols, clipped_v, clipped_p = [], [], 0, 0
        for i, n in enumerate(lengths):
            for t in range(n):
                vc = min(max(v[i][t], v_old[i][t] - clip), v_old[i][t] + clip)
                a, b = (v[i][t] - ret[i][t]) ** 2, (vc - ret[i][t]) ** 2
                vals.append(max(a, b))
                clipped_v += b > a
                ratio = math.exp(lp[i][t] - old[i][t])
                u, c = -adv[i][t] * ratio, -adv[i][t] * min(max(ratio, 1 - eps), 1 + eps)
                pols.append(max(u, c))
                clipped_p += c > u
        assert vl.item() == pytest.approx(0.5 * sum(vals) / len(vals), abs=1e-6)
        assert pl.item() == pytest.approx(sum(pols) / len(pols), abs=1e-6)
        assert vm["value/clip_frac"] == pytest.approx(clipped_v / len(vals))
        assert pm["clip/frac"] == pytest.approx(clipped_p / len(pols))
        unclipped, _ = value_loss(_pad(v, width), _pad(v_old, width), _pad(ret, width), m, None)
        expect = (
            0.5
            * sum((v[i][t] - ret[i][t]) ** 2 for i, n in enumerate(lengths) for t in range(n))
            / len(vals)
        )
        assert unclipped.item() == pytest.approx(expect, abs=1e-6)


def test_to_padded_round_trips_the_packed_token_stream() -> None:
    seq_ids = torch.tensor([0, 0, 0, 1, 2, 2])
    x = torch.arange(6, dtype=torch.float32)
    out, mask = to_padded(x, seq_ids, 3)
    assert out.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    assert out[mask].tolist() == x.tolist()


def test_gae_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="share one"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
