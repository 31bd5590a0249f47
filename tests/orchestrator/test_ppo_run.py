"""PPO with a critic through the one loop: the config, the batch's rewards, and
``caravela run --set algorithm=ppo`` in one process and on a local Ray cluster, resumed
from its checkpoint (the critic with it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.protocol import Completion, GenerateRequest, GenerateResult
from orchestrator.config import ConfigError, load_config
from orchestrator.data import Prompt
from orchestrator.rollout import Rollout, build_batch
from reward_envs.protocol import RewardResult


def _rollout(scores: list[float]) -> Rollout:
    completions = [
        Completion(
            token_ids=[3, 4],
            text="x",
            logprobs=[-1.0, -1.0],
            finish_reason="stop",
            policy_version=0,
            engine_id="e0",
        )
        for _ in scores
    ]
    rewards = [RewardResult(s, None, None, {}, "arith", "h", "0:1") for s in scores]
    return Rollout(
        [Prompt(id="a", text="q", env="arith")],
        [GenerateRequest(request_id="a", prompt_ids=[1, 2])],
        [GenerateResult(request_id="a", completions=completions)],
        [rewards],
    )


def test_ppo_samples_carry_their_scores():
    cfg = load_config(None, ["algorithm=ppo"])
    assert cfg.trainer.loss.type == "ppo" and cfg.trainer.loss.critic_lr == 1e-4
    batch, _ = build_batch(0, _rollout([0.0, 1.0, 0.5]), cfg)
    assert batch is not None
    assert [s.reward for s in batch.samples] == [0.0, 1.0, 0.5]
    with pytest.raises(ConfigError, match="set both to 'ppo', or neither"):
        load_config(None, ["trainer.loss.type=ppo"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", pytest.param("ray", marks=pytest.mark.long)])
def test_caravela_run_ppo_trains_the_critic_and_resumes_it(tmp_path, mode):
    """4 steps, then resumed to 6: the critic's values leave 0 (its head starts there) and
    its loss is reported every step; the resumed steps load the critic from the
    checkpoint (a checkpoint without it would fail to load)."""
    out = tmp_path / "run"
    base = [
        "algorithm=ppo",
        f"cluster.mode={mode}",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        "trainer.loss.critic_lr=1e-3",
        "checkpoint.every_steps=2",
        f"output_dir='{out}'",
    ]
    exe = str(Path(sys.executable).parent / "caravela")

    def run(steps: int, *flags: str) -> None:
        sets = [*base, f"steps={steps}"]
        cmd = [exe, "run", *flags, *(x for s in sets for x in ("--set", s))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    run(4)
    run(6, "--resume")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    trained = [m for m in metrics if "value/loss" in m]
    assert len(trained) >= 4
    assert trained[0]["value/mean"] == 0.0  # the head starts at zero
    assert any(abs(m["value/mean"]) > 1e-4 for m in trained[1:])  # the critic learned
    assert all(m["critic/grad_norm"] > 0 for m in trained)
    assert (out / "checkpoints" / "step-000006").is_dir()
