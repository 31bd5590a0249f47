"""Reward function of the built-in ``code`` env: run the model's Python against test cases.

``score(prompt, completion, tests=None, asserts=None, all_or_nothing=False, **fields)``
returns ``{"score": passed / total, "info": {"passed", "total", "failures"}}``, where each
test runs in a fresh bubblewrap sandbox (``sandbox.py``: no network, nothing of the host
writable or secret, hard CPU, memory, process, file and output limits). Stdlib only.

Item fields:

* ``tests``: a list (or a JSON string of a list) of ``{"input": stdin, "output": expected
  stdout}``. A test passes when the program exits 0 and its stdout equals the expected
  output after stripping trailing whitespace from each line and dropping trailing empty
  lines. Each test is one run.
* ``asserts``: Python source appended after the solution (one run for all of them). Each
  top-level ``assert`` statement is one test; other statements (imports, helper
  assignments) run in order but are not counted. A block without a top-level assert (say
  ``def check(f): ...`` then ``check(f)``) is one test, passed when all of it runs without
  an exception. A solution that raises or exits before the asserts fails them all.
* ``all_or_nothing``: when true the score is 1.0 only if every test passes, else 0.0 (and
  the tests after the first failure are skipped).
* Limits (optional): ``cpu_limit_s`` (default 2; whole seconds, rounded up),
  ``wall_limit_s`` (5), ``memory_limit_mb`` (256: each process's address space, and all of
  the run's processes together where a memory cgroup is available, see ``cgroup.py``),
  ``process_limit`` (64), ``output_limit_bytes`` (1 MiB, stdout and stderr each) per run;
  out-of-range values are an error. All the runs of one item share a wall-time budget
  of ``ITEM_BUDGET_S`` (20 s): tests it leaves no time for fail. The manifest's timeout
  (30 s) covers that budget plus the sandbox's own start and teardown.

The code is the last fenced block tagged ``python`` (or ``py``, ``python3``), else the last
fenced block of any kind, else the whole completion; a block left unclosed at the end of the
completion (a cut-off generation) runs to the end.

A solution that fails, hangs, crashes or attacks the sandbox fails its tests (score
contribution 0). A sandbox that cannot run (bwrap missing, setup error) or a malformed
item raises: the pool reports an ``exception`` error, never a silent 0.
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import replace
from typing import Any

if __package__:
    from . import sandbox
else:  # loaded by the env worker as the top-level module ``env``
    import sandbox  # type: ignore[no-redef]

ITEM_BUDGET_S = 20.0
"""Wall time all the runs of one item may take together."""
MIN_RUN_S = 0.2
"""A run is not started with less budget left than this."""
LIMIT_FIELDS: dict[str, tuple[str, type, float, float]] = {
    "cpu_limit_s": ("cpu_s", float, 0.1, 10.0),
    "wall_limit_s": ("wall_s", float, 0.1, 10.0),
    "memory_limit_mb": ("memory_mb", int, 64, 4096),
    "process_limit": ("processes", int, 1, 512),
    "output_limit_bytes": ("output_bytes", int, 1, 16 << 20),
}
"""Item field -> (``sandbox.Limits`` attribute, type, minimum, maximum)."""
MAX_FAILURES = 5
"""Failure reasons kept in ``info``."""
NO_TIME = f"not run: the item's {ITEM_BUDGET_S:g} s budget was spent"
PYTHON_TAGS = {"python", "py", "python3"}
_FENCE = re.compile(
    r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE
)


def extract_code(completion: str) -> str:
    """The last ``python`` fenced block, else the last fenced block, else everything."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    tagged = [code for tag, code in blocks if tag in PYTHON_TAGS]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else completion


def normalize(output: str) -> list[str]:
    """Lines with trailing whitespace stripped, trailing empty lines dropped."""
    lines = [line.rstrip() for line in output.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def parse_tests(tests: Any) -> list[tuple[str, str]]:
    """``tests`` as (stdin, expected stdout) pairs; ValueError if malformed."""
    if tests is None:
        return []
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, list):
        raise ValueError(f"tests must be a list of {{input, output}}, got {type(tests).__name__}")
    pairs = []
    for i, t in enumerate(tests):
        if not (
            isinstance(t, dict)
            and isinstance(t.get("input"), str)
            and isinstance(t.get("output"), str)
        ):
            raise ValueError(f"tests[{i}] must be {{'input': str, 'output': str}}, got {t!r:.100}")
        pairs.append((t["input"], t["output"]))
    return pairs


def split_asserts(asserts: Any) -> list[tuple[str, bool]]:
    """Top-level statements of ``asserts`` as (source, is an assert); ValueError if bad."""
    if asserts is None or asserts == "":
        return []
    if not isinstance(asserts, str):
        raise ValueError(f"asserts must be a string of Python, got {type(asserts).__name__}")
    try:
        tree = ast.parse(asserts)
    except SyntaxError as e:
        raise ValueError(f"asserts is not valid Python: {e}") from None
    return [
        (ast.get_source_segment(asserts, stmt) or ast.unparse(stmt), isinstance(stmt, ast.Assert))
        for stmt in tree.body
    ]


def limits_from(fields: dict[str, Any]) -> sandbox.Limits:
    """Default limits, overridden by the item's limit fields; ValueError if out of range."""
    limits = sandbox.Limits()
    for name, (attr, kind, low, high) in LIMIT_FIELDS.items():
        value = fields.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or kind is int and not float(value).is_integer():
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
        limits = replace(limits, **{attr: kind(value)})
    return limits


def budgeted(limits: sandbox.Limits, deadline: float) -> sandbox.Limits | None:
    """``limits`` with the wall limit cut to the item's remaining budget; None if spent."""
    left = deadline - time.monotonic()
    if left < MIN_RUN_S:
        return None
    return replace(limits, wall_s=min(limits.wall_s, left))


def run_test(code: str, stdin: str, expected: str, limits: sandbox.Limits) -> str | None:
    """Why the solution fails this stdin/stdout test, or None if it passes."""
    result = sandbox.run(code, limits, stdin)
    problem = result.problem(limits)
    if problem is not None:
        return problem
    got = result.stdout.decode("utf-8", "replace")
    if normalize(got) == normalize(expected):
        return None
    return f"wrong answer: expected {expected.strip()!r:.60}, got {got.strip()!r:.60}"


def count_tests(statements: list[tuple[str, bool]]) -> int:
    """Tests in an asserts block: its assert statements; a block with none is one test."""
    return sum(is_test for _, is_test in statements) or (1 if statements else 0)


def run_asserts(
    code: str, statements: list[tuple[str, bool]], limits: sandbox.Limits
) -> list[tuple[str, str | None]]:
    """(test name, why it failed or None) for each test of the block, in one run."""
    result = sandbox.run_statements(code, [source for source, _ in statements], limits)
    setup = result.outcomes.get("setup", "")
    unreported = (
        f"the solution raised {setup.removeprefix('fail ')}"
        if setup
        else result.problem(limits) or "the solution exited before the asserts ran"
    )
    verdicts = []
    for i, (source, _) in enumerate(statements):
        outcome = result.outcomes.get(str(i))
        why = None if outcome == "ok" else outcome.removeprefix("fail ") if outcome else unreported
        verdicts.append((" ".join(source.split())[:60], why))
    if count_tests(statements) == sum(is_test for _, is_test in statements):
        return [v for v, (_, is_test) in zip(verdicts, statements, strict=True) if is_test]
    failed = [f"{name}: {why}" for name, why in verdicts if why is not None]  # no asserts
    return [("asserts", failed[0] if failed else None)]


class Tally:
    """Passed tests and failure reasons of one item, and its wall-time budget."""

    def __init__(self, all_or_nothing: bool) -> None:
        self.all_or_nothing = all_or_nothing
        self.deadline = time.monotonic() + ITEM_BUDGET_S
        self.passed = self.failed = 0
        self.failures: list[str] = []

    def stop(self) -> bool:
        """all_or_nothing and a test failed: the rest cannot change the score."""
        return self.all_or_nothing and bool(self.failures)

    def add(self, name: str, why: str | None, count: int = 1) -> None:
        """``count`` tests named ``name`` passed (``why`` None) or failed for ``why``."""
        if why is None:
            self.passed += count
        else:
            self.failed += count
            self.failures.append(f"{name}: {why}")


def run_cases(code: str, cases: list[tuple[str, str]], limits: sandbox.Limits, t: Tally) -> None:
    for i, (stdin, expected) in enumerate(cases):
        if t.stop():
            return
        run_limits = budgeted(limits, t.deadline)
        t.add(f"test {i}", run_test(code, stdin, expected, run_limits) if run_limits else NO_TIME)


def run_all_asserts(
    code: str, statements: list[tuple[str, bool]], limits: sandbox.Limits, t: Tally
) -> None:
    if not statements or t.stop():
        return
    run_limits = budgeted(limits, t.deadline)
    if run_limits is None:
        t.add("asserts", NO_TIME, count=count_tests(statements))
        return
    for name, why in run_asserts(code, statements, run_limits):
        t.add(name, why)


def score(
    prompt: str,
    completion: str,
    tests: Any = None,
    asserts: Any = None,
    all_or_nothing: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Fraction of the item's tests the completion's code passes (rules: module docstring)."""
    del prompt
    if not isinstance(all_or_nothing, bool):
        raise ValueError(f"all_or_nothing must be true or false, got {all_or_nothing!r}")
    limits = limits_from(fields)
    cases = parse_tests(tests)
    statements = split_asserts(asserts)
    total = len(cases) + count_tests(statements)
    if total == 0:
        raise ValueError("the item has no tests: give it `tests` and/or `asserts`")
    code = extract_code(completion)
    tally = Tally(all_or_nothing)
    run_cases(code, cases, limits, tally)
    run_all_asserts(code, statements, limits, tally)
    failures = tally.failures
    skipped = total - tally.passed - tally.failed
    if skipped:
        failures.append(f"{skipped} more test(s) skipped after a failure (all_or_nothing)")
    return {
        "score": result_score(tally.passed, total, all_or_nothing),
        "info": info(tally.passed, total, failures),
    }


def result_score(passed: int, total: int, all_or_nothing: bool) -> float:
    if all_or_nothing:
        return 1.0 if passed == total else 0.0
    return passed / total


def info(passed: int, total: int, failures: list[str]) -> dict[str, Any]:
    shown = [f[:200] for f in failures[:MAX_FAILURES]]
    if len(failures) > MAX_FAILURES:
        shown.append(f"... and {len(failures) - MAX_FAILURES} more")
    return {"passed": passed, "total": total, "failures": shown}
