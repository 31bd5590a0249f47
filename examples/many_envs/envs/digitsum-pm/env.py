"""Reward function of the env ``digitsum-pm``, written by make_envs.py (many_envs).

Prompts: the tiny arithmetic task, operators + then -. Score 1.0 when the answer's digit sum (a
`toolz` pipeline) equals the reference's, else 0.0. Uses ``toolz==1.2.0``, installed only in
this env's venv.
"""

from __future__ import annotations

import re

import toolz
import toolz.curried

DIGIT_SUM = toolz.compose(sum, toolz.curried.map(int), str, abs)


def verify(prompt: str, completion: str, answer: str) -> bool:
    got = extract(completion)
    return got is not None and DIGIT_SUM(got) == DIGIT_SUM(int(answer))


MARKER = "The answer is "
_NUMBER = re.compile(r"\s*([+-]?\d+)\.?\s*")
_QUESTION = re.compile(r"Q: (\d+)([+-])(\d+)([+-])(\d+) A: ")


def extract(completion: str) -> int | None:
    """The integer after the last "The answer is " (a trailing "." allowed), else None."""
    idx = completion.rfind(MARKER)
    if idx < 0:
        return None
    m = _NUMBER.fullmatch(completion[idx + len(MARKER) :])
    return int(m.group(1)) if m else None


def question_parts(prompt: str) -> tuple[int, str, int, str, int]:
    """``"Q: 50+98-54 A: "`` -> ``(50, "+", 98, "-", 54)``."""
    m = _QUESTION.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not a prompt of this task: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    return int(a), op1, int(b), op2, int(c)


def question(prompt: str) -> str:
    """``"Q: 50+98-54 A: "`` -> ``"50+98-54"``."""
    a, op1, b, op2, c = question_parts(prompt)
    return f"{a}{op1}{b}{op2}{c}"


def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def reference(prompt: str) -> str:
    """The task's reference completion of ``prompt`` (examples/tiny_arith/task.py)."""
    a, op1, b, op2, c = question_parts(prompt)
    r1 = apply(a, op1, b)
    r2 = apply(r1, op2, c)
    return f"{a}{op1}{b}={r1}, {r1}{op2}{c}={r2}. The answer is {r2}."


def score(prompt: str, completion: str, answer: str) -> float:
    """1.0 when ``verify`` holds, else 0.0."""
    return 1.0 if verify(prompt, completion, answer) else 0.0
