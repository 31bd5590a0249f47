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
* ``asserts``: Python source run against the solution's names (one run for all of them),
  as if appended after it. Each top-level ``assert`` statement is one test; other
  statements (imports, helper assignments) run in order but are not counted. A block
  without a top-level assert (say ``def check(f): ...`` then ``check(f)``) is one test,
  passed when all of it runs without an exception. A solution that raises or exits before
  the asserts fails them all. The solution never sees this code, and its values count only
  as plain data (None, bool, int, float, str, bytes, list, tuple, set, frozenset, dict of
  those, exact types). An ``assert`` of a comparison with a literal operand
  (``assert f(3) == 9``, ``assert 0 < g(x) <= 1``) or of a truth value (``assert h(2)``,
  ``assert not h(3)``) is split: its literal operands (``9``, ``[1, 2]``) stay here; the
  others are evaluated in the sandbox's judge process and their values compared here.
  Everything else runs whole in the judge, where the solution's objects are equal only to
  themselves. How, and what a solution can and cannot do: ``docs/envs.md``, "The code
  env's threat model".
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
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

if __package__:
    from . import runner, sandbox
else:  # loaded by the env worker as the top-level module ``env``
    import runner  # type: ignore[no-redef]
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
COMPARISONS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
PLAIN = "None, bool, int, float, str, bytes, list, tuple, set, frozenset or dict"
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


@dataclass(frozen=True)
class Statement:
    """One top-level statement of ``asserts``, and how its verdict is reached.

    ``operands`` (a split assert): per operand, ``(True, literal value)`` kept here or
    ``(False, job index)`` evaluated in the judge. ``ops``: the comparison's operators;
    none for a truth-value assert, whose one operand is negated when ``negate``. A
    statement with no ``operands`` runs whole as job ``job``.
    """

    source: str
    is_test: bool
    operands: tuple[tuple[bool, Any], ...] = ()
    ops: tuple[type[ast.cmpop], ...] = ()
    negate: bool = False
    job: int = -1

    @property
    def name(self) -> str:
        return " ".join(self.source.split())[:60]


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def split_asserts(asserts: Any) -> tuple[list[Statement], list[tuple[int, str, str]]]:
    """The statements of ``asserts``, and the judge's jobs ((index, ``eval`` | ``exec``,
    source)) they need; ValueError if ``asserts`` is not Python."""
    if asserts is None or asserts == "":
        return [], []
    if not isinstance(asserts, str):
        raise ValueError(f"asserts must be a string of Python, got {type(asserts).__name__}")
    try:
        tree = ast.parse(asserts)
    except SyntaxError as e:
        raise ValueError(f"asserts is not valid Python: {e}") from None
    statements: list[Statement] = []
    jobs: list[tuple[int, str, str]] = []

    def job(kind: str, node: ast.AST) -> int:
        jobs.append((len(jobs), kind, ast.get_source_segment(asserts, node) or ast.unparse(node)))
        return len(jobs) - 1

    def operand(node: ast.expr) -> tuple[bool, Any]:
        is_literal, value = _literal(node)
        return (True, value) if is_literal else (False, job("eval", node))

    for stmt in tree.body:
        source = ast.get_source_segment(asserts, stmt) or ast.unparse(stmt)
        if not isinstance(stmt, ast.Assert):
            statements.append(Statement(source, False, job=job("exec", stmt)))
            continue
        test = stmt.test
        if isinstance(test, ast.Compare):
            nodes = (test.left, *test.comparators)
            if not any(_literal(node)[0] for node in nodes) or not all(
                type(op) in COMPARISONS for op in test.ops
            ):  # no expected value to keep out (``type(f(3)) == int``): runs whole
                statements.append(Statement(source, True, job=job("exec", stmt)))
                continue
            operands = tuple(operand(node) for node in nodes)
            ops = tuple(type(op) for op in test.ops)
            statements.append(Statement(source, True, operands, ops))
        else:
            negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
            inner = test.operand if isinstance(test, ast.UnaryOp) and negate else test
            statements.append(Statement(source, True, (operand(inner),), negate=negate))
    return statements, jobs


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


def count_tests(statements: list[Statement]) -> int:
    """Tests in an asserts block: its assert statements; a block with none is one test."""
    return sum(st.is_test for st in statements) or (1 if statements else 0)


def verdict(st: Statement, records: dict[int, tuple[Any, ...]], missing: str) -> str | None:
    """Why ``st`` failed, or None if it passed, from the judge's records."""
    if not st.operands:
        record = records.get(st.job)
        if record is None:
            return missing
        return None if record[1] == "ok" else str(record[2])
    values = []
    for is_literal, value in st.operands:
        if is_literal:
            values.append(value)
            continue
        record = records.get(value)
        if record is None:
            return missing
        if record[1] == "fail":
            return str(record[2])
        if record[1] != "value":
            kind = "of the solution's own type" if record[2] == "Remote" else f"a {record[2]}"
            return f"an operand is an object {kind}, not a plain {PLAIN}"
        try:
            values.append(runner.decode(record[2]))
        except ValueError as e:
            return str(e)
    try:
        if st.ops:
            passed = all(
                COMPARISONS[op](left, right)
                for op, left, right in zip(st.ops, values, values[1:], strict=False)
            )
        else:
            passed = bool(values[0]) != st.negate
        if not passed:
            return f"AssertionError: got {values[0]!r:.60}"
    except (TypeError, ValueError, RecursionError, MemoryError) as e:
        return f"{type(e).__name__}: {e}"[:200]
    return None


def run_asserts(
    code: str,
    statements: list[Statement],
    jobs: list[tuple[int, str, str]],
    limits: sandbox.Limits,
) -> list[tuple[str, str | None]]:
    """(test name, why it failed or None) for each test of the block, in one run."""
    result = sandbox.run_judged(code, jobs, limits)
    records = {r[0]: r for r in result.records if isinstance(r[0], int) and len(r) >= 2}
    setup = next((str(r[1]) for r in result.records if r[0] == "setup"), None)
    missing = (
        f"the solution failed before the asserts ran: {setup}"
        if setup is not None
        else result.problem(limits) or "the solution's process died before the asserts ran"
    )
    verdicts = [(st.name, verdict(st, records, missing)) for st in statements]
    if count_tests(statements) == sum(st.is_test for st in statements):
        return [v for v, st in zip(verdicts, statements, strict=True) if st.is_test]
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
    code: str,
    statements: list[Statement],
    jobs: list[tuple[int, str, str]],
    limits: sandbox.Limits,
    t: Tally,
) -> None:
    if not statements or t.stop():
        return
    run_limits = budgeted(limits, t.deadline)
    if run_limits is None:
        t.add("asserts", NO_TIME, count=count_tests(statements))
        return
    for name, why in run_asserts(code, statements, jobs, run_limits):
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
    statements, jobs = split_asserts(asserts)
    total = len(cases) + count_tests(statements)
    if total == 0:
        raise ValueError("the item has no tests: give it `tests` and/or `asserts`")
    code = extract_code(completion)
    tally = Tally(all_or_nothing)
    run_cases(code, cases, limits, tally)
    run_all_asserts(code, statements, jobs, limits, tally)
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
