"""Tests of the embedded tiny default model, its arithmetic task and ``orchestrator.evaluate``."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.evaluate import evaluate_passk, in_process
from reward_envs.builtin.arith.env import score

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny_arith"
MODEL_DIR = EXAMPLE / "model"
DATA_DIR = EXAMPLE / "data"


def _load_task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_arith_task", EXAMPLE / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


task = _load_task()


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The shipped model and tokenizer, loaded strictly from the repo (no hub access)."""
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, local_files_only=True, dtype=torch.float32
    )
    return model, tok


def test_model_loads_offline_and_is_small(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    for name in ("bos", "eos", "pad"):
        tok_id = getattr(tok, f"{name}_token_id")
        assert getattr(model.config, f"{name}_token_id") == tok_id
        assert getattr(model.generation_config, f"{name}_token_id") == tok_id
    assert tok.eos_token == "</s>"
    assert (MODEL_DIR / "model.safetensors").is_file()
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 6 * 1024 * 1024


def test_tokenizer_round_trips_task_text(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    rng = random.Random(123)
    texts = ["Q: 3-50+2 A: 3-50=-47, -47+2=-45. The answer is -45."]
    for _ in range(200):
        ex = task.make_example(rng)
        texts.append(ex["prompt"] + ex["completion"])
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Llama style: plain tok(prompt) gives the model input <s> + prompt (what vLLM sends).
    plain = tok.encode("Q: 1 A: ", add_special_tokens=False)
    assert tok("Q: 1 A: ").input_ids == [tok.bos_token_id, *plain]
    assert tok.convert_ids_to_tokens(tok.encode("Q: 1+2-3 A: ", add_special_tokens=False)) == [
        "Q: ", "1", "+", "2", "-", "3", " A: "
    ]  # fmt: skip


def test_generator_format_and_determinism() -> None:
    ex = task.make_example(random.Random(0))
    assert ex["prompt"] == f"Q: {ex['question']} A: "
    assert ex["completion"].endswith(f". The answer is {ex['answer']}.")
    first = next(task.iter_split("train", 0))
    assert first["prompt"] == "Q: 50+98-54 A: "
    assert first["completion"] == "50+98=148, 148-54=94. The answer is 94."
    assert first["answer"] == "94"
    a = [task.make_example(random.Random(7)) for _ in range(3)]
    b = [task.make_example(random.Random(7)) for _ in range(3)]
    assert a == b
    s1, s2 = task.iter_split("train", 5), task.iter_split("train", 5)
    assert [next(s1) for _ in range(50)] == [next(s2) for _ in range(50)]
    assert task.make_rows("heldout", 20, 1) == task.make_rows("heldout", 20, 1)


def test_splits_never_overlap() -> None:
    train = task.iter_split("train", 0)
    held = task.iter_split("heldout", 0)
    assert not any(task.is_heldout(next(train)["question"]) for _ in range(2000))
    assert all(task.is_heldout(next(held)["question"]) for _ in range(200))


def test_shipped_data_files() -> None:
    train = _read_jsonl(DATA_DIR / "train.jsonl")
    held = _read_jsonl(DATA_DIR / "heldout.jsonl")
    assert len(train) == 20_000 and len({r["prompt"] for r in train}) == 20_000
    assert len(held) == 1_000 and len({r["prompt"] for r in held}) == 1_000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(task.is_heldout(r["prompt"][3:-4]) for r in held)
    assert held == task.make_rows("heldout", 1_000, 0)  # regenerable with --seed 0
    assert train[0] == {
        "id": "arith-train-000000",
        "prompt": "Q: 50+98-54 A: ",
        "answer": "94",
        "env": "arith",
    }


def test_evaluate_passk_leaves_room_for_rl(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rows = _read_jsonl(DATA_DIR / "heldout.jsonl")[:64]
    rng_state = torch.get_rng_state()
    # One generate call of 64 x 8 sequences, no greedy pass: a few seconds on 2 cores.
    res = evaluate_passk(model, tok, rows, in_process(score), k=8, batch_size=512, greedy=False)
    assert torch.equal(torch.get_rng_state(), rng_state)  # caller's RNG untouched
    assert res.n_prompts == 64 and res.k == 8
    assert res.passk > res.pass1 > 0


def test_evaluate_passk_is_seeded(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rows = _read_jsonl(DATA_DIR / "heldout.jsonl")[:8]
    first = evaluate_passk(model, tok, rows, in_process(score), k=4, seed=3)
    assert first == evaluate_passk(model, tok, rows, in_process(score), k=4, seed=3)
    assert 0.0 <= first.greedy_acc <= 1.0
