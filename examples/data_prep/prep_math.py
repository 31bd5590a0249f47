"""MATH-format file -> Caravela JSONL: ``problem`` -> ``prompt``, and the worked
``solution`` -> the content of its last ``\\boxed{...}`` (``\\fbox{...}`` too), braces and
all nested groups kept: ``"... $\\boxed{\\frac{1}{2}}$."`` -> ``"\\frac{1}{2}"``.

Training needs no conversion: a ``[[datasets]]`` entry with ``prompt_field = "problem"``,
``id_field = ""`` and ``fields = { answer = "solution" }`` reads MATH's files as they are
(the ``math`` env unboxes a boxed reference itself). Convert for what reads Caravela's own
columns (``eval.heldout``: ``id``, ``prompt``, ``answer``, ``env``), for an env that wants
the bare answer, or to wrap each problem in an instruction (``--template``)::

    python examples/data_prep/prep_math.py MATH/test.jsonl data/math_heldout.jsonl \\
        --env math --template $'{prompt}\\nPut the final answer in \\\\boxed{}.'
"""

from __future__ import annotations

import re
import sys
from typing import Any

import prep_io

BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(solution: str) -> str:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``solution``, its nested
    braces matched."""
    starts = [m.end() for m in BOX.finditer(solution)]
    if not starts:
        raise ValueError(f"the solution has no \\boxed{{...}} answer ({solution[-60:]!r})")
    depth, start = 1, starts[-1]
    for i in range(start, len(solution)):
        if solution[i] == "{" and solution[i - 1] != "\\":
            depth += 1
        elif solution[i] == "}" and solution[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                answer = solution[start:i].strip()
                if not answer:
                    raise ValueError("the last \\boxed{} is empty")
                return answer
    raise ValueError(f"the last \\boxed{{ is never closed ({solution[start - 7 :][:60]!r})")


def convert(row: dict[str, Any], template: str) -> dict[str, Any]:
    problem = prep_io.column(row, "problem")
    return {
        "prompt": template.replace("{prompt}", problem),
        "answer": last_boxed(prep_io.column(row, "solution")),
    }


if __name__ == "__main__":
    parser = prep_io.arguments(
        "MATH-format (problem, solution with \\boxed{}) -> Caravela JSONL",
        "prompt text, {prompt} standing for the problem (default: the problem alone)",
    )
    sys.exit(prep_io.main(parser.parse_args(), convert))
