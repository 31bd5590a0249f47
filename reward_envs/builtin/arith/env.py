"""Reward function of the built-in ``arith`` env (the tiny default model's verifiable task).

Owns answer extraction and scoring for completions such as
``"50+98=148, 148-54=94. The answer is 94."``: the score is 1.0 when the integer after the
last ``"The answer is "`` equals the reference answer, else 0.0. Stdlib only, so the env's
venv needs no requirements (see ``caravela-env.toml``, entry point ``env:score``).
"""

from __future__ import annotations

import re

ANSWER_MARKER = "The answer is "
_ANSWER_RE = re.compile(r"\s*([+-]?\d+)\.?\s*")


def extract_answer(completion: str) -> str | None:
    """The integer text after the last ``"The answer is "`` (a trailing "." allowed), or None.

    Nothing but optional whitespace and one "." may follow the number, so a truncated or
    rambling completion (``"The answer is 94 or 95"``) yields None.
    """
    idx = completion.rfind(ANSWER_MARKER)
    if idx < 0:
        return None
    m = _ANSWER_RE.fullmatch(completion[idx + len(ANSWER_MARKER) :])
    return m.group(1) if m else None


def score(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the extracted integer equals ``int(answer)``, else 0.0 (``prompt`` is unused)."""
    del prompt
    got = extract_answer(completion)
    if got is None:
        return 0.0
    try:
        return 1.0 if int(got) == int(answer.strip()) else 0.0
    except ValueError:
        return 0.0
