"""The ``code`` env's sandbox: per-run overhead, and scoring throughput through a pool.

Run: ``.venv/bin/python bench/code_sandbox.py`` (needs ``bwrap``, Debian's bubblewrap;
no network; ~1 min on the 2-core box). Writes ``bench/results/code_sandbox.json`` and
``.md``. ``--quick`` does fewer repeats and items and only prints (a smoke run, not a
measurement).

1. Per-run overhead: the same solution file and stdin, run (a) in the sandbox
   (``sandbox.run``: bwrap, namespaces, seccomp, the in-sandbox runner setting limits and
   forking the solution, the memory and CPU cgroups where there are), (a') the same
   without the cgroups, and (b)
   unsandboxed with plain ``subprocess.run([python, "-I", "-S", file])``, the same
   interpreter. Two solutions: trivial (sum two numbers from stdin) and small CPU-bound
   (a sum over 300k squares, ~50 ms). Runs alternate a / a' / b; medians of
   ``REPEATS`` after a warm-up; overhead = sandboxed - plain.
2. Throughput: ``ITEMS`` items through an ``EnvPool`` on the env built in its own venv (a
   temporary store), 1 and 2 workers. Items alternate two kinds: a stdin/stdout problem
   with 2 tests (2 sandbox runs) and an asserts problem with 3 asserts (1 run); half the
   solutions are wrong. Median of 3 timed calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reward_envs.builder import build  # noqa: E402
from reward_envs.builtin.code import cgroup, sandbox  # noqa: E402
from reward_envs.manifest import load_manifest  # noqa: E402
from reward_envs.pool import EnvPool  # noqa: E402
from reward_envs.protocol import Item  # noqa: E402

CODE = REPO / "reward_envs" / "builtin" / "code"
RESULTS = REPO / "bench" / "results"
SOLUTIONS = {
    "trivial": ("a, b = map(int, input().split())\nprint(a + b)\n", "2 40\n"),
    "cpu_bound": ("n = int(input())\nprint(sum(i * i for i in range(n)))\n", "300000\n"),
}
STDIO = "```python\nn = int(input())\nprint(n * n{bug})\n```"
ASSERTS = "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n{bug}):\n        a, b = b, a + b\n    return a\n```"  # noqa: E501


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def overhead(repeats: int) -> dict[str, dict[str, float | None]]:
    """Median seconds per run, sandboxed vs plain subprocess, for each solution."""
    python, _ = sandbox.interpreter()
    limits = sandbox.Limits()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (code, stdin) in SOLUTIONS.items():
            path = Path(tmp) / f"{name}.py"
            path.write_text(code)
            expected = subprocess.run(
                [python, "-I", "-S", str(path)], input=stdin.encode(), capture_output=True
            ).stdout

            def boxed(code: str = code, stdin: str = stdin, expected: bytes = expected) -> None:
                assert sandbox.run(code, limits, stdin).stdout == expected

            def no_cgroup() -> None:
                where, cgroup._layout = cgroup._layout, None
                cpu, cgroup._cpu_layout = cgroup._cpu_layout, None
                try:
                    boxed()
                finally:
                    cgroup._layout, cgroup._cpu_layout = where, cpu

            def plain(path: Path = path, stdin: str = stdin, expected: bytes = expected) -> None:
                cmd = [python, "-I", "-S", str(path)]
                assert subprocess.run(cmd, input=stdin.encode(), capture_output=True).stdout == (
                    expected
                )

            boxed()  # warm-up
            plain()
            runs = [(timed(boxed), timed(no_cgroup), timed(plain)) for _ in range(repeats)]
            b, n, p = (statistics.median(r[i] for r in runs) * 1e3 for i in range(3))
            out[name] = {
                "sandboxed_ms": b,
                "sandboxed_no_cgroup_ms": n if cgroup.layout() or cgroup.cpu_layout() else None,
                "plain_ms": p,
                "overhead_ms": b - p,
            }
            print(name, out[name], flush=True)
    return out


def items(n: int) -> list[Item]:
    """Half stdio (2 tests), half asserts (3 asserts); every other pair has a bug."""
    made = []
    for i in range(n):
        bug = " + 1" if (i // 2) % 2 else ""
        if i % 2 == 0:
            tests = [{"input": "3", "output": "9"}, {"input": "12", "output": "144"}]
            made.append(Item("", STDIO.format(bug=bug), {"tests": tests}))
        else:
            asserts = "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55"
            made.append(Item("", ASSERTS.format(bug=bug), {"asserts": asserts}))
    return made


def throughput(n: int, calls: int) -> dict[str, Any]:
    """Items/s through a venv-built pool with 1 and 2 workers."""
    batch = items(n)
    runs = sum(len(i.fields["tests"]) if "tests" in i.fields else 1 for i in batch)
    out: dict[str, Any] = {"items": n, "sandbox_runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        built = build(CODE, Path(tmp) / "store")
        manifest = load_manifest(CODE)
        for workers in (1, 2):
            pool = EnvPool(manifest, built, workers=workers)
            try:
                pool.score(batch)  # warm-up (also each worker's interpreter probe)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    results = pool.score(batch)
                    times.append(time.perf_counter() - t0)
            finally:
                pool.close()
            assert all(r.error is None for r in results), [r.error for r in results][:3]
            scores = [r.score for r in results]
            assert scores.count(1.0) == sum((i // 2) % 2 == 0 for i in range(n)), scores[:8]
            seconds = statistics.median(times)
            out[f"{workers}w"] = {"seconds": seconds, "items_per_s": n / seconds}
            print(workers, out[f"{workers}w"], flush=True)
    return out


def environment() -> dict[str, Any]:
    bwrap = subprocess.run([sandbox.bwrap(), "--version"], capture_output=True, text=True)
    python, _ = sandbox.interpreter()
    where, cpu = cgroup.layout(), cgroup.cpu_layout()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "bwrap": bwrap.stdout.strip(),
        "sandbox_python": python,
        "root": os.geteuid() == 0,
        "memory_cgroup": str(where.base) if where else None,
        "cpu_cgroup": str(cpu.base) if cpu else None,
        "loadavg_before": os.getloadavg()[0],
    }


def report(result: dict[str, Any]) -> str:
    o, t, e = result["overhead"], result["throughput"], result["environment"]
    lines = [
        "# code env sandbox",
        "",
        f"{e['cpus']} CPUs, kernel {e['kernel']}, {e['bwrap']}, sandbox Python "
        f"{e['sandbox_python']}, run as {'root (sandbox as nobody)' if e['root'] else 'a user'}.",
        f"1-min load average {e['loadavg_before']:.1f} before, "
        f"{e.get('loadavg_after', float('nan')):.1f} after (wall times scale with it).",
        "",
        f"Per run, median of {result['config']['repeats']} (after a warm-up):",
        "",
        "| solution | sandboxed ms | same, no cgroups | plain subprocess ms | overhead ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in o.items():
        n = r["sandboxed_no_cgroup_ms"]
        lines.append(
            f"| {name} | {r['sandboxed_ms']:.1f} | {'-' if n is None else f'{n:.1f}'} | "
            f"{r['plain_ms']:.1f} | {r['overhead_ms']:.1f} |"
        )
    lines += [
        "",
        "Overhead = sandboxed - plain. Joining the memory and CPU cgroups is the difference"
        " between the first two columns; the rest is bwrap's namespaces, mounts and seccomp"
        " filter, and the runner setting the limits (these runs are stdin/stdout ones).",
    ]
    lines += [
        "",
        f"Scoring {t['items']} items ({t['sandbox_runs']} sandbox runs) through an EnvPool, "
        "env in its own venv; median of "
        f"{result['config']['calls']} calls after a warm-up:",
        "",
        "| workers | seconds | items/s |",
        "|---:|---:|---:|",
    ]
    for w in (1, 2):
        lines.append(f"| {w} | {t[f'{w}w']['seconds']:.2f} | {t[f'{w}w']['items_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, not a measurement")
    args = parser.parse_args()
    repeats, n, calls = (5, 20, 1) if args.quick else (30, 100, 3)
    result: dict[str, Any] = {
        "config": {"repeats": repeats, "items": n, "calls": calls},
        "environment": environment(),
    }
    result["overhead"] = overhead(repeats)
    result["throughput"] = throughput(n, calls)
    result["environment"]["loadavg_after"] = os.getloadavg()[0]
    print(report(result))
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "code_sandbox.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "code_sandbox.md").write_text(report(result))


if __name__ == "__main__":
    main()
