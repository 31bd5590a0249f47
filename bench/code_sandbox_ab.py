"""The ``code`` env's cost per run in two checkouts, side by side: CPU as well as wall time.

Run: ``.venv/bin/python bench/code_sandbox_ab.py BEFORE_TREE [AFTER_TREE]`` (AFTER_TREE
defaults to this checkout), e.g. with ``git worktree add /tmp/code-before <commit>``.
Writes ``bench/results/code_sandbox_ab.json`` and ``.md``.

Wall time per run swings with the machine's load (other jobs on a shared box); the CPU
time a run costs (this process plus every reaped descendant: bwrap, the sandbox's
processes) hardly does, so the two trees are compared on both. Each round runs a fresh
process per tree, alternating trees, ``RUNS`` runs each of: a stdin/stdout solution
(``sandbox.run``) and a 3-assert item scored by ``env.score`` (one sandbox run in both
trees). Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ROUNDS, RUNS = 5, 30
MEASURE = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, sys.argv[1] + "/reward_envs/builtin/code")
import env, sandbox
runs = int(sys.argv[2])
stdio = "a, b = map(int, input().split())\nprint(a + b)\n"
fib = "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
fib += "        a, b = b, a + b\n    return a\n```"
asserts = "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55"

def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

def measure(fn):
    fn()  # warm-up: the interpreter probe
    walls, c0 = [], cpu()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": (cpu() - c0) / runs * 1e3}

def one_stdio():
    assert sandbox.run(stdio, sandbox.Limits(), "2 40\n").stdout == b"42\n"

def one_asserts():
    assert env.score("", fib, asserts=asserts)["score"] == 1.0

print(json.dumps({"stdio": measure(one_stdio), "asserts": measure(one_asserts)}))
"""


def one(tree: Path, runs: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tree), str(runs)],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", default=REPO)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    samples: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    loads = [os.getloadavg()[0]]
    for i in range(args.rounds):
        for name, tree in trees.items():
            samples[name].append(one(tree, RUNS))
            print(i, name, samples[name][-1], flush=True)
        loads.append(os.getloadavg()[0])
    medians: dict[str, Any] = {
        name: {
            kind: {m: statistics.median(s[kind][m] for s in rows) for m in ("wall_ms", "cpu_ms")}
            for kind in ("stdio", "asserts")
        }
        for name, rows in samples.items()
    }
    result = {
        "trees": {k: str(v) for k, v in trees.items()},
        "rounds": args.rounds,
        "runs_per_round": RUNS,
        "cpus": os.cpu_count(),
        "loadavg": loads,
        "medians": medians,
        "samples": samples,
    }
    lines = [
        "# code env sandbox: before / after, per run",
        "",
        f"{result['cpus']} CPUs, 1-min load average {min(loads):.1f} to {max(loads):.1f} "
        f"during the run. Medians of {args.rounds} rounds x {RUNS} runs, trees alternating.",
        "",
        "| run | before wall ms | after wall ms | before CPU ms | after CPU ms | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in ("stdio", "asserts"):
        b, a = medians["before"][kind], medians["after"][kind]
        lines.append(
            f"| {kind} | {b['wall_ms']:.1f} | {a['wall_ms']:.1f} | {b['cpu_ms']:.1f} | "
            f"{a['cpu_ms']:.1f} | {a['cpu_ms'] / b['cpu_ms']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "code_sandbox_ab.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "code_sandbox_ab.md").write_text(text)


if __name__ == "__main__":
    main()
