"""Reward function of the built-in ``gsm8k`` env: exact numeric match of GSM8K-style answers.

``score(prompt, completion, answer)`` is 1.0 when the completion's final number equals the
reference number, else 0.0. Stdlib only (``caravela-env.toml`` declares no requirements).

Rules:

* The reference is a number, or a GSM8K solution ending in ``#### N`` (the number after the
  last ``####`` is used). A reference holding no number scores every completion 0.
* The completion's final number is, in this order: the first number after the last
  ``####``; else the first number after the last ``"answer is"`` / ``"answer:"``
  (case-insensitive); else the last number anywhere in the completion. A marker with no
  number after it falls through to the next rule.
* Numbers may carry a sign (``-``, or the unicode minus ``−``), a ``$`` before them, commas as
  thousands separators (``1,234,567``: only when every group after a comma has exactly three
  digits, so ``3,5`` reads as 3 followed by 5), a decimal part (``.5``, ``72.50``), and
  anything after them (a trailing ``.``, ``%``, unit words: ``72 dollars``).
* Numbers compare exactly as decimals: ``72`` = ``72.0`` = ``$72.00``; ``72.5`` != ``72``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_NUMBER_RE = re.compile(
    r"(?<![\w.])(-?)(?:\$\s?)?"  # sign, then an optional dollar sign
    r"((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"  # 1,234.5 | 1234.5 | .5
)
_HASHES_RE = re.compile(r"####")
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\s*(?:is\b|:)")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})


def numbers(text: str) -> list[Decimal]:
    """Every number in ``text``, in order, as exact decimals."""
    found = []
    for m in _NUMBER_RE.finditer(text.translate(_MINUS_SIGNS)):
        try:
            found.append(Decimal(m.group(1) + m.group(2).replace(",", "")))
        except InvalidOperation:
            continue
    return found


def number_after_last(marker: re.Pattern[str], text: str) -> Decimal | None:
    """The first number after the last match of ``marker``, or None."""
    matches = list(marker.finditer(text))
    if not matches:
        return None
    after = numbers(text[matches[-1].end() :])
    return after[0] if after else None


def extract_answer(completion: str) -> Decimal | None:
    """The completion's final number (rules in the module docstring), or None."""
    for marker in (_HASHES_RE, _ANSWER_IS_RE):
        found = number_after_last(marker, completion)
        if found is not None:
            return found
    every = numbers(completion)
    return every[-1] if every else None


def reference_number(answer: str) -> Decimal | None:
    """The reference's number: after the last ``####`` when present, else the first one."""
    found = number_after_last(_HASHES_RE, answer)
    if found is not None:
        return found
    every = numbers(answer)
    return every[0] if every else None


def score(prompt: str, completion: str, answer: str, **fields: Any) -> float:
    """1.0 if the completion's final number equals the reference number, else 0.0."""
    del prompt, fields
    reference = reference_number(answer)
    got = extract_answer(completion)
    return 1.0 if reference is not None and got is not None and got == reference else 0.0
