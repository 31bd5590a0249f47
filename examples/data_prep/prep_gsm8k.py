"""GSM8K-format file -> Caravela JSONL: ``question`` -> ``prompt``, and the reference
``answer`` (a worked solution ending in ``#### <number>``) -> the number alone.

Training needs no conversion: a ``[[datasets]]`` entry with ``prompt_field = "question"``
and ``id_field = ""`` reads GSM8K's files as they are (the ``gsm8k`` and ``math`` envs take
the whole solution as the reference and read what follows its last ``####``). Convert for
what reads Caravela's own columns (``eval.heldout``: ``id``, ``prompt``, ``answer``,
``env``), for an env that wants the bare number, or to wrap each question in an
instruction (``--template``)::

    python examples/data_prep/prep_gsm8k.py gsm8k/test.jsonl data/gsm8k_heldout.jsonl \\
        --env gsm8k --template $'{prompt}\\nGive the final number after "####".'
"""

from __future__ import annotations

import re
import sys
from typing import Any

import prep_io


def final_answer(solution: str) -> str:
    """The number after the last ``####`` of a GSM8K solution, without thousands commas,
    ``$`` or a trailing ``.``: ``"... #### 1,234"`` -> ``"1234"``."""
    _, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError(f"the answer has no '#### <number>' line ({solution[-60:]!r})")
    number = tail.strip().replace(",", "").lstrip("$").rstrip(".").strip()
    if not re.fullmatch(r"-?\d+(\.\d+)?", number):
        raise ValueError(f"what follows '####' is not a number ({tail.strip()[:40]!r})")
    return number


def convert(row: dict[str, Any], template: str) -> dict[str, Any]:
    question = prep_io.column(row, "question")
    return {
        "prompt": template.replace("{prompt}", question),
        "answer": final_answer(prep_io.column(row, "answer")),
    }


if __name__ == "__main__":
    parser = prep_io.arguments(
        "GSM8K-format (question, answer with '#### N') -> Caravela JSONL",
        "prompt text, {prompt} standing for the question (default: the question alone)",
    )
    sys.exit(prep_io.main(parser.parse_args(), convert))
