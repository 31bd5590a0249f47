"""Online DPO from verifiable rewards through the one loop: pairs from a step's groups
(orchestrator/pairs.py), the config's checks, and ``caravela run --set algorithm=dpo`` in
one process and on a local Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.protocol import Completion, GenerateRequest, GenerateResult
from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.data import Prompt
from orchestrator.rollout import Rollout, build_batch
from reward_envs.protocol import RewardResult


def _group(rid: str, scores: list[float | None], lengths: list[int] | None = None):
    lengths = lengths or [2] * len(scores)
    completions = [
        Completion(
            token_ids=list(range(3, 3 + n)),
            text="x",
            logprobs=[-1.0] * n,
            finish_reason="stop",
            policy_version=0,
            engine_id="e0",
        )
        for n in lengths
    ]
    rewards = [
        RewardResult(
            s,
            None if s is not None else "boom",
            None if s is not None else "crash",
            {},
            "arith",
            "h",
            "0:1",
        )
        for s in scores
    ]
    request = GenerateRequest(request_id=rid, prompt_ids=[1, 2])
    return (
        Prompt(id=rid, text="q", env="arith"),
        request,
        GenerateResult(request_id=rid, completions=completions),
        rewards,
    )


def _rollout(*groups) -> Rollout:
    return Rollout(*(list(x) for x in zip(*groups, strict=True)))


def test_each_group_gives_its_best_against_its_worst():
    cfg = load_config(None, ["algorithm=dpo", "dpo.margin=0.5"])
    r = _rollout(
        _group("a", [0.0, 1.0, 0.0, 1.0]),  # best: the first 1.0, worst: the first 0.0
        _group("b", [0.2, 0.6, 0.4, 0.3]),  # gap 0.4 <= margin: no pair
        _group("c", [1.0, None, 0.0, 0.0]),  # an errored completion: no pair
        _group("d", [0.0, 0.0, 1.0, 0.0], lengths=[2, 3, 4, 5]),
    )
    batch, stats = build_batch(3, r, cfg)
    assert batch is not None
    assert [(s.sample_id, s.chosen, s.pair) for s in batch.samples] == [
        ("a/1", True, 0),
        ("a/0", False, 0),
        ("d/2", True, 1),
        ("d/0", False, 1),
    ]
    assert batch.pairs() == [(0, 1), (2, 3)]
    assert [s.reward for s in batch.samples] == [1.0, 0.0, 1.0, 0.0]
    assert stats["pairs"] == 2 and stats["pairs/no_gap"] == 1 and stats["groups_kept"] == 2
    assert stats["pairs/score_gap"] == 1.0 and stats["reward_errors"] == 1


def test_no_pair_no_batch():
    cfg = load_config(None, ["algorithm=dpo"])
    batch, stats = build_batch(0, _rollout(_group("a", [1.0, 1.0])), cfg)
    assert batch is None and stats["pairs"] == 0


def test_algorithm_and_loss_go_together():
    cfg = load_config(None, ["algorithm=dpo", "trainer.loss.variant=ipo"])
    assert cfg.trainer.loss.type == "dpo" and cfg.trainer.loss.variant == "ipo"
    assert RunConfig().algorithm == "grpo"
    with pytest.raises(ConfigError, match="set both to 'dpo', or neither"):
        load_config(None, ["trainer.loss.type=dpo"])
    with pytest.raises(ConfigError, match="set both to 'dpo', or neither"):
        load_config(None, ["algorithm=dpo", "trainer.loss.type=grpo"])
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid variant"):
        load_config(
            None,
            ["algorithm=dpo", "trainer.loss.variant=hinge", "trainer.loss.label_smoothing=0.1"],
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", pytest.param("ray", marks=pytest.mark.long)])
def test_caravela_run_dpo_makes_pairs_and_trains(tmp_path, mode):
    """A short online-DPO run of the embedded default: every step makes pairs and trains on
    them (one new version each), the implicit reward margin grows from 0 (the policy starts
    as its reference), and the run ends with its checkpoint, report and final model."""
    out = tmp_path / "run"
    sets = [
        "algorithm=dpo",
        f"cluster.mode={mode}",
        "steps=6",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        "trainer.lr=3e-4",
        f"output_dir='{out}'",
    ]
    exe = str(Path(sys.executable).parent / "caravela")
    cmd = [exe, "run", *(x for s in sets for x in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    trained = [m for m in metrics if "dpo/margin" in m]
    assert all(m["pairs"] > 0 for m in trained) and len(trained) >= 4
    assert sum(m["pairs"] for m in metrics) >= 20
    assert trained[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference
    assert trained[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert max(abs(m["dpo/margin"]) for m in trained[1:]) > 1e-3  # the policy moved
    assert metrics[-1]["version"] == len(trained)
    assert (out / "checkpoints" / "step-000006").is_dir() and (out / "final").is_dir()


def _preference_rows(path: Path, n: int = 64) -> Path:
    """Rows of the tiny arith train set with a chosen (the right answer) and a rejected (not
    an answer) completion: a preference dataset the arith env can still score for eval."""
    from common import paths

    rows = [json.loads(x) for x in Path(paths.TINY_TRAIN).read_text().splitlines()[:n]]
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({**r, "chosen": r["answer"], "rejected": "no idea"}) + "\n")
    return path


def test_offline_rows_become_pairs(tmp_path):
    from transformers import AutoTokenizer

    from common import paths
    from orchestrator.pairs import offline_rollout

    tok = AutoTokenizer.from_pretrained(paths.TINY_MODEL)
    cfg = load_config(None, ["algorithm=dpo", "dpo.mode=offline"])
    good = Prompt(
        id="p",
        text="Q: 1+2+3 A: ",
        env="arith",
        fields={"answer": "6", "chosen": "6", "rejected": "7"},
    )
    r = offline_rollout([good], tok, {}, version=lambda: 3)
    batch, stats = build_batch(0, r, cfg)
    assert batch is not None and stats["pairs"] == 1
    chosen, rejected = batch.samples
    assert chosen.chosen and not rejected.chosen
    assert chosen.completion_ids == tok("6", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert chosen.engine_logprobs is None and chosen.policy_version == 3
    bad = Prompt(id="q", text="Q: 1 A: ", env="arith", fields={"answer": "1", "chosen": "1"})
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        offline_rollout([bad], tok, {})


@pytest.mark.slow
def test_caravela_run_offline_dpo_learns_the_preferences(tmp_path):
    """Offline DPO through the same loop: every step trains on the dataset's pairs (8 per
    step), and the policy comes to prefer the dataset's chosen completions: the implicit
    reward margin on fresh pairs (rows not trained on before) rises above 0 and the loss
    falls below log 2."""
    data = _preference_rows(tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    sets = [
        "algorithm=dpo",
        "dpo.mode=offline",
        "cluster.mode=local",
        "steps=8",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        "trainer.lr=3e-4",
        f"datasets=[{{ path = '{data}', env = 'arith' }}]",
        f"output_dir='{out}'",
    ]
    exe = str(Path(sys.executable).parent / "caravela")
    cmd = [exe, "run", *(x for s in sets for x in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["pairs"] for m in metrics] == [8.0] * 8
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    late = metrics[-3:]
    assert all(m["dpo/margin"] > 0.1 for m in late) and all(m["loss"] < 0.65 for m in late)
    assert all(m["dpo/accuracy"] == 1.0 for m in late)
    assert metrics[-1]["version"] == 8
