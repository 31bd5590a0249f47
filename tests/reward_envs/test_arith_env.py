"""Tests of the built-in ``arith`` reward env (answer extraction, scoring, manifest examples)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from reward_envs.builtin.arith.env import extract_answer, score

ENV_DIR = Path(__file__).resolve().parents[2] / "reward_envs" / "builtin" / "arith"
PROMPT = "Q: 50+98-54 A: "


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("50+98=148, 148-54=94. The answer is 94.", "94"),
        ("3-50=-47, -47+2=-45. The answer is -45.", "-45"),
        ("The answer is 7", "7"),
        ("The answer is 1. The answer is 2.", "2"),
        ("The answer is 12.\n", "12"),
        ("50+98=148", None),
        ("The answer is ", None),
        ("The answer is 9.4", None),
        ("The answer is 94 or 95.", None),
        ("The answer is x.", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_score_correct_incorrect_malformed() -> None:
    assert score(PROMPT, "50+98=148, 148-54=94. The answer is 94.", "94") == 1.0
    assert score(PROMPT, "50+98=148, 148-54=94. The answer is 94.", " 94 ") == 1.0
    assert score(PROMPT, "50+98=148, 148-54=95. The answer is 95.", "94") == 0.0
    assert score(PROMPT, "50+98=148, 148-54=94.", "94") == 0.0
    assert score(PROMPT, "The answer is -0.", "0") == 1.0
    assert score(PROMPT, "The answer is 94.", "not a number") == 0.0


def test_manifest_and_examples() -> None:
    manifest = tomllib.loads((ENV_DIR / "caravela-env.toml").read_text())
    assert manifest["name"] == "arith"
    assert manifest["entry_point"] == "env:score"
    assert manifest["requirements"] == []
    examples = manifest["examples"]
    assert len(examples) == 3
    assert {ex["expected_score"] for ex in examples} == {0.0, 1.0}
    for ex in examples:
        assert score(ex["prompt"], ex["completion"], ex["answer"]) == ex["expected_score"]
