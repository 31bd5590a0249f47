"""Held-out evaluation per ``[[eval.sets]]`` entry, on the run's engines and env pools.

Config errors (a set whose env is not in the run, the tiny-arith default left in place
when the datasets changed env, a row naming another env) come before anything starts.
A run on real local Ray evaluates two sets scored by two envs at the start, every
``eval.every_steps`` and at the end, with a curve per set in metrics.jsonl, eval.json and
report.png. With a 100M-parameter model, the driver holds no model tensors at any log
line of the run (checked by walking its objects): the engines evaluate, a trainer-node
task exports."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from common import paths
from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.evaluate import load_sets


def rows(path: Path, n: int) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()[:n]]


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def test_a_set_scored_by_an_env_not_in_the_run_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="eval.sets 'math' is scored by env 'math'"):
        load_config(
            overrides=[
                f"eval.sets=[{{name='math', file='{paths.TINY_HELDOUT}', env='math'}}]",
            ]
        )
    with pytest.raises(ValueError, match="with \\[\\[eval.sets\\]\\] give each set's file"):
        RunConfig.model_validate(
            {
                "eval": {
                    "heldout": str(paths.TINY_HELDOUT),
                    "sets": [{"name": "a", "file": str(paths.TINY_HELDOUT), "env": "arith"}],
                }
            }
        )
    with pytest.raises(ValueError, match="names must be unique"):
        RunConfig.model_validate(
            {"eval": {"sets": [{"name": "a", "file": "x.jsonl", "env": "arith"}] * 2}}
        )


def test_changing_the_datasets_but_not_the_heldout_set_is_an_error(tmp_path):
    """The tiny-arith held-out rows say env 'arith'; a run that only has gsm8k used to score
    them with gsm8k silently. Now it is refused, naming the fix."""
    train = write_jsonl(tmp_path / "train.jsonl", rows(paths.TINY_TRAIN, 4))
    cfg = RunConfig.model_validate(
        {
            "envs": [{"name": "gsm8k", "path": str(paths.ARITH_ENV.parent / "gsm8k")}],
            "datasets": [{"path": str(train), "env": "gsm8k"}],
        }
    )
    with pytest.raises(ConfigError, match="scored by env 'arith', which is not in envs"):
        load_sets(cfg)


def test_rows_of_another_env_and_rows_without_env(tmp_path):
    mixed = [*rows(paths.TINY_HELDOUT, 2), {**rows(paths.TINY_HELDOUT, 3)[2], "env": "math"}]
    cfg = RunConfig.model_validate(
        {
            "eval": {
                "sets": [
                    {
                        "name": "s",
                        "file": str(write_jsonl(tmp_path / "m.jsonl", mixed)),
                        "env": "arith",
                    }
                ]
            }
        }
    )
    with pytest.raises(ConfigError, match="rows name env 'math': split the file"):
        load_sets(cfg)
    bare = [{k: v for k, v in r.items() if k != "env"} for r in rows(paths.TINY_HELDOUT, 3)]
    path = write_jsonl(tmp_path / "bare.jsonl", bare)
    with pytest.raises(ConfigError, match="set eval.env"):
        load_sets(RunConfig.model_validate({"eval": {"heldout": str(path)}}))
    (s,) = load_sets(RunConfig.model_validate({"eval": {"heldout": str(path), "env": "arith"}}))
    assert s.spec.env == "arith" and [p.env for p in s.prompts] == ["arith"] * 3
    assert s.spec.n == 200 and s.spec.k == 8  # eval.num_prompts / eval.k fill them in


@pytest.mark.slow
def test_two_sets_two_envs_evaluated_on_the_engines_through_the_run(local_ray, tmp_path):
    from orchestrator.loop import run

    bare = [{k: v for k, v in r.items() if k != "env"} for r in rows(paths.TINY_HELDOUT, 8)]
    second = write_jsonl(tmp_path / "second.jsonl", bare)
    out = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"output_dir='{out}'",
            "steps=2",
            "rollout.prompts_per_step=8",
            "rollout.group_size=4",
            f"envs=[{{name='arith', path='{paths.ARITH_ENV}'}}, "
            f"{{name='arith2', path='{paths.ARITH_ENV}'}}]",
            f"eval.sets=[{{name='first', file='{paths.TINY_HELDOUT}', env='arith', n=8, k=2}}, "
            f"{{name='second', file='{second}', env='arith2', n=6, k=3, greedy=false}}]",
            "eval.every_steps=1",
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
        ]
    )
    lines: list[str] = []
    summary = run(cfg, log=lines.append)

    assert set(summary.before_sets) == set(summary.after_sets) == {"first", "second"}
    assert summary.after_sets["first"].n_prompts == 8 and summary.after_sets["first"].k == 2
    assert summary.after_sets["second"].n_prompts == 6 and summary.after_sets["second"].k == 3
    assert summary.before == summary.before_sets["first"]  # the headline is the first set
    # each set scored by its own env's pool (both pools saw eval items)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["envs/arith2/items"] >= 2 * (6 * 3)  # before + step 1
    assert "eval/first/pass1" not in metrics[0]  # step 0 evaluates as "before"
    for name in ("first", "second"):
        assert 0.0 <= metrics[1][f"eval/{name}/pass1"] <= 1.0
    report = json.loads((out / "eval.json").read_text())
    assert {"before", "after", "sets"} <= set(report)
    assert report["before"] == report["sets"]["first"]["before"]
    for name in ("first", "second"):
        assert [p["step"] for p in report["sets"][name]["curve"]] == [0, 1, 2]
    assert report["sets"]["second"]["curve"][1]["accuracy"] == metrics[1]["eval/second/pass1"]
    assert (out / "report.png").stat().st_size > 10_000
    assert any(x.startswith("step 1 [second]: ") for x in lines), lines
    assert any(x.startswith("after [first]: ") for x in lines)


def big_model(path: Path) -> int:
    """A random Llama of about 100M parameters with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(paths.TINY_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=14,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_the_driver_holds_no_model_tensors(local_ray, tmp_path):
    """A 100M-parameter model: whenever the run logs (evaluations, steps, checkpoint,
    export), the driver's live tensors add up to far less than one layer of it."""
    import torch

    from orchestrator.loop import run

    params = big_model(tmp_path / "model")
    assert params > 95_000_000
    out = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"model='{tmp_path / 'model'}'",
            f"output_dir='{out}'",
            "steps=1",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=4",
            "advantage.drop_zero_variance=false",  # random weights score 0: train anyway
            "eval.num_prompts=2",
            "eval.k=2",
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
        ]
    )
    held: list[int] = []
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        gc.collect()
        held.append(
            sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel())
        )

    summary = run(cfg, log=log)
    assert summary.history[-1]["version"] == 1.0  # a step trained and its weights were pushed
    assert any("exported" in x and "on a trainer node" in x for x in lines), lines
    assert (out / "final" / "model.safetensors").is_file()
    assert len(held) >= 5
    assert max(held) < params // 100, (max(held), params)
