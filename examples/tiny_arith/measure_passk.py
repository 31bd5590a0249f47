"""CLI: greedy accuracy, sampled pass@1 and pass@k of a model on the tiny arithmetic task.

Owns nothing but argument parsing and printing; the work is
:func:`orchestrator.evaluate.evaluate_passk` scored by the built-in ``arith`` env. Prints a
small table, then the same numbers as one JSON line (last line of stdout)::

    python examples/tiny_arith/measure_passk.py --model examples/tiny_arith/model \\
        --data examples/tiny_arith/data/heldout.jsonl --k 8 --n 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.evaluate import evaluate_passk, in_process
from reward_envs.builtin.arith.env import score

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "model")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "heldout.jsonl")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--n", type=int, default=1000, help="first N rows of --data")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with args.data.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.n]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    res = evaluate_passk(
        model,
        tok,
        rows,
        in_process(score),
        k=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    seconds = time.perf_counter() - t0

    print(f"model {args.model}  data {args.data}  n={res.n_prompts}  T={args.temperature}")
    print(f"{'metric':<10}{'value':>8}")
    print(f"{'greedy':<10}{res.greedy_acc:>8.3f}")
    print(f"{'pass@1':<10}{res.pass1:>8.3f}")
    print(f"{f'pass@{res.k}':<10}{res.passk:>8.3f}")
    print(json.dumps({**res.to_dict(), "temperature": args.temperature, "seconds": seconds}))


if __name__ == "__main__":
    main()
