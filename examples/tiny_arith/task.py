"""Seeded generator for the tiny chain-of-thought arithmetic task (``env = "arith"``).

Owns the task definition used by the embedded default model: problem sampling, the exact
prompt/completion text format, the held-out rule, the infinite train/held-out streams and the
CLI that writes the shipped ``train.jsonl`` / ``heldout.jsonl`` files.

A problem has three operands, each uniform in 1..99, and two operators, each ``+`` or ``-``::

    prompt:     "Q: 50+98-54 A: "
    completion: "50+98=148, 148-54=94. The answer is 94."

The completion evaluates one binary operation per step, left to right (results may be
negative: ``3-50=-47, -47+2=-45. The answer is -45.``). A question such as ``"50+98-54"`` is
held out when ``int(md5(question).hexdigest(), 16) % 20 == 0``; held-out questions never
appear in the train stream or files.

Regenerate the shipped data with::

    python examples/tiny_arith/task.py --seed 0 --out examples/tiny_arith/data

Stdlib only, so the file can be imported anywhere (trainer, tests, the reward env).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

ENV_NAME = "arith"
SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 20
N_TRAIN = 20_000
N_HELDOUT = 1_000


def is_heldout(question: str) -> bool:
    """True when ``question`` (e.g. ``"50+98-54"``) belongs to the held-out split."""
    digest = hashlib.md5(question.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def make_example(rng: random.Random) -> dict[str, str]:
    """Draw one problem from ``rng``; returns id, question, prompt, completion and answer."""
    a, b, c = (rng.randint(1, 99) for _ in range(3))
    op1, op2 = (rng.choice("+-") for _ in range(2))
    question = f"{a}{op1}{b}{op2}{c}"
    r1 = _apply(a, op1, b)
    r2 = _apply(r1, op2, c)
    completion = f"{a}{op1}{b}={r1}, {r1}{op2}{c}={r2}. The answer is {r2}."
    digest = hashlib.md5(question.encode("utf-8")).hexdigest()[:12]
    return {
        "id": f"{ENV_NAME}-{digest}",
        "question": question,
        "prompt": f"Q: {question} A: ",
        "completion": completion,
        "answer": str(r2),
    }


def iter_split(split: str, seed: int) -> Iterator[dict[str, str]]:
    """Infinite seeded stream of examples of ``split`` ("train" or "heldout").

    Draws from ``random.Random(seed)`` and keeps only the questions of the requested split,
    so the two streams never share a question. Repeats are possible (no de-duplication).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    want_heldout = split == "heldout"
    rng = random.Random(seed)
    while True:
        ex = make_example(rng)
        if is_heldout(ex["question"]) == want_heldout:
            yield ex


def make_rows(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """First ``n`` distinct prompts of ``iter_split(split, seed)`` as JSONL rows.

    Rows are ``{"id": "arith-<split>-000123", "prompt", "answer", "env": "arith"}`` (no
    completion). The build script uses this too, so its held-out eval set equals the file.
    """
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for ex in iter_split(split, seed):
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        rows.append(
            {
                "id": f"{ENV_NAME}-{split}-{len(rows):06d}",
                "prompt": ex["prompt"],
                "answer": ex["answer"],
                "env": ENV_NAME,
            }
        )
        if len(rows) == n:
            return rows
    raise AssertionError("unreachable: iter_split is infinite")


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-heldout", type=int, default=N_HELDOUT)
    args = parser.parse_args(argv)
    for split, n in (("train", args.n_train), ("heldout", args.n_heldout)):
        path = args.out / f"{split}.jsonl"
        write_jsonl(path, make_rows(split, n, args.seed))
        print(f"wrote {n} rows to {path}")


if __name__ == "__main__":
    main()
