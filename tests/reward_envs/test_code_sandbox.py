"""The built-in ``code`` env: correct solutions pass, and a battery of escapes is contained.

Every item is scored the real way, through an ``EnvPool`` worker (process isolation, for
speed; one test builds the env's venv). Each escape must be scored as a failed test (a
score, not an error), leave the worker alive and the machine as it was, and be followed
by an item scored normally. Needs ``bwrap`` (Debian: bubblewrap). Run it inside a
loopback-only network namespace:

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest -q \\
        tests/reward_envs/test_code_sandbox.py'
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reward_envs.builder import build, process_env
from reward_envs.builtin.code import env as code_env
from reward_envs.builtin.code import sandbox
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult

CODE = Path(code_env.__file__).resolve().parent
ESCAPED = [{"input": "", "output": "escaped"}]
"""Every attack prints ``escaped`` only if it worked: a contained one fails this test."""
SUM = "```python\nprint(sum(map(int, input().split())))\n```"
SUM_TESTS = [{"input": "1 2\n", "output": "3"}, {"input": "40 2", "output": "42\n"}]
SANDBOX_UID = sandbox.NOBODY if os.geteuid() == 0 else os.getuid()

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bwrap")


def solution(body: str) -> str:
    return f"Here is my solution:\n```python\n{body.strip()}\n```\n"


def sandbox_processes() -> int:
    """Live (not zombie) processes of the sandbox's uid on this machine. Zombies are
    dead: a sandbox orphaned by its killed worker goes to the nearest subreaper, which
    in this test session can be pytest itself (in-process ``score`` calls make it one)."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == SANDBOX_UID:
                with open(f"/proc/{pid}/stat") as f:
                    count += f.read().rpartition(")")[2].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            pass
    return count


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvPool]:
    """One worker: an attack and the item after it run in the same worker process."""
    p = EnvPool(
        load_manifest(CODE), process_env(CODE), workers=1, log_dir=tmp_path_factory.mktemp("logs")
    )
    yield p
    p.close()


def score(pool: EnvPool, completion: str, **fields: object) -> RewardResult:
    [result] = pool.score([Item("", completion, dict(fields))])
    return result


def assert_contained(pool: EnvPool, attack: RewardResult, baseline: int) -> None:
    """The attack was a failed test; the worker lives; the next item scores normally."""
    assert attack.error is None, attack.error
    assert attack.score == 0.0, attack.info
    assert attack.info["passed"] == 0 and attack.info["total"] == 1
    pids = pool.pids()
    after = score(pool, SUM, tests=SUM_TESTS)
    assert (after.score, after.error) == (1.0, None)
    assert pool.pids() == pids and pool.stats["restarts"] == 0
    deadline = time.monotonic() + 5
    while sandbox_processes() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() <= baseline, "sandbox processes outlived the item"


@pytest.fixture
def baseline() -> int:
    return sandbox_processes()


# -- scoring -------------------------------------------------------------------------------
def test_correct_stdio_and_assert_solutions_pass(pool: EnvPool) -> None:
    fib = "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    fib += "    return a"
    results = pool.score(
        [
            Item("", SUM, {"tests": SUM_TESTS}),
            Item("", solution(fib), {"asserts": "assert fib(0) == 0\nassert fib(10) == 55"}),
            Item(
                "",
                solution(
                    fib
                    + "\nimport sys\ndata = sys.stdin.read()\nif data:\n    print(fib(int(data)))"
                ),
                {"tests": [{"input": "7", "output": "13"}], "asserts": "assert fib(1) == 1"},
            ),  # fmt: skip
        ]
    )
    assert [(r.score, r.error) for r in results] == [(1.0, None)] * 3
    assert [r.info["total"] for r in results] == [2, 2, 2]


def test_partial_credit_and_all_or_nothing(pool: EnvPool) -> None:
    half = solution("n = int(input())\nprint(n * n if n < 10 else n)")
    tests = [{"input": "3", "output": "9"}, {"input": "12", "output": "144"}]
    asserts = "assert f(1) == 1\nassert f(2) == 4\nassert f(3) == 9\nassert f(4) == 16"
    partial, strict, asserted = pool.score(
        [
            Item("", half, {"tests": tests}),
            Item("", half, {"tests": tests, "all_or_nothing": True}),
            Item("", solution("def f(x):\n    return x * x if x < 3 else x"), {"asserts": asserts}),
        ]
    )
    assert (partial.score, partial.info["passed"], partial.info["total"]) == (0.5, 1, 2)
    assert "wrong answer" in partial.info["failures"][0]
    assert (strict.score, strict.error) == (0.0, None)
    assert (asserted.score, asserted.info["passed"]) == (0.5, 2)


def test_extract_code_picks_the_last_python_block() -> None:
    text = "```python\nA\n```\ntext\n```py\nB\n```\n```\nC\n```"
    assert code_env.extract_code(text) == "B\n"
    assert code_env.extract_code("```\nC\n```\n```sh\nD\n```") == "D\n"
    assert code_env.extract_code("print(1)") == "print(1)"
    assert code_env.extract_code("```python\nprint(1)\n") == "print(1)\n"  # cut off


def test_bad_items_and_a_broken_sandbox_are_errors_not_zeros(
    pool: EnvPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_tests, bad_limit = pool.score(
        [Item("", SUM, {}), Item("", SUM, {"tests": SUM_TESTS, "memory_limit_mb": 10**6})]
    )
    assert no_tests.error_kind == "exception" and "no tests" in (no_tests.error or "")
    assert bad_limit.error_kind == "exception" and "memory_limit_mb" in (bad_limit.error or "")
    monkeypatch.setattr(sandbox, "_python", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: None)
    with pytest.raises(sandbox.SandboxError, match="bubblewrap"):
        code_env.score("", SUM, tests=SUM_TESTS)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox, "_python", ("/nonexistent/python3", Path("/nonexistent")))
    with pytest.raises(sandbox.SandboxError, match="did not start|failed"):
        code_env.score("", SUM, tests=SUM_TESTS)


def test_item_budget_caps_the_time_of_many_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_manifest(CODE).timeout_s >= code_env.ITEM_BUDGET_S + sandbox.SETUP_TIMEOUT_S
    assert code_env.LIMIT_FIELDS["wall_limit_s"][3] <= code_env.ITEM_BUDGET_S
    monkeypatch.setattr(code_env, "ITEM_BUDGET_S", 1.0)
    slow = solution("import time\ntime.sleep(0.45)\nprint(input())")
    t0 = time.monotonic()
    result = code_env.score("", slow, tests=[{"input": "x", "output": "x"}] * 4)
    assert time.monotonic() - t0 < 2.5
    assert result["info"]["passed"] >= 1 and result["score"] < 1.0
    assert any("budget" in f for f in result["info"]["failures"])


# -- the escape battery --------------------------------------------------------------------
def test_network_connect_to_loopback_is_refused(pool: EnvPool, baseline: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    attack = solution(f"""
import socket
for host in ("127.0.0.1", "localhost"):
    try:
        socket.create_connection((host, {port}), timeout=1).sendall(b"hi")
        print("escaped")
    except OSError as e:
        print(type(e).__name__)
""")
    result = score(pool, attack, tests=ESCAPED)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    listener.close()
    assert_contained(pool, result, baseline)


def test_writes_outside_tmp_fail(pool: EnvPool, baseline: int, tmp_path: Path) -> None:
    target = tmp_path / "escape" / "pwned.txt"
    repo_target = CODE / "pwned.txt"
    attack = solution(f"""
import os
ok = 0
for path in ({str(target)!r}, {str(repo_target)!r}, "/usr/pwned", "/pwned", "/etc/pwned"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("pwned")
        # the sandbox's /tmp is private: a checkout under /tmp is shadowed, not reached
        outside = path.startswith(({str(CODE)!r}, "/usr", "/etc", "/pwned"))
        ok += outside and not path.startswith("/tmp/")
    except OSError:
        pass
print("escaped" if ok else "contained")
""")
    result = score(pool, attack, tests=ESCAPED)
    assert not target.exists() and not (tmp_path / "escape").exists()
    assert not repo_target.exists()
    assert_contained(pool, result, baseline)


def test_etc_shadow_is_unreadable(pool: EnvPool, baseline: int) -> None:
    attack = solution("""
import os
for path in ("/etc/shadow", "/etc/passwd", "/root/.bashrc", "/proc/1/environ"):
    try:
        print(open(path).read()[:40])
        if path == "/etc/shadow":
            print("escaped")
    except OSError as e:
        print(path, type(e).__name__)
""")
    result = score(pool, attack, tests=ESCAPED)
    assert "root:" not in str(result.info)
    assert_contained(pool, result, baseline)


def test_fork_bomb_is_contained(pool: EnvPool, baseline: int) -> None:
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], sandbox_processes())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    attack = solution("""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""")
    try:
        result = score(pool, attack, tests=ESCAPED, wall_limit_s=2)
    finally:
        done.set()
        watcher.join()
    limit = sandbox.Limits().processes
    assert limit // 2 < peak[0] - baseline <= limit + 2  # the bomb ran and hit the limit
    assert "timed out" in result.info["failures"][0]
    assert_contained(pool, result, baseline)


def test_two_gigabyte_allocation_fails(pool: EnvPool, baseline: int) -> None:
    attack = solution(
        "x = bytearray(2 * 1024**3)\nx[::4096] = b'1' * len(x[::4096])\nprint('escaped')"
    )
    result = score(pool, attack, tests=ESCAPED)
    assert "MemoryError" in result.info["failures"][0]
    assert_contained(pool, result, baseline)


@pytest.mark.skipif(sandbox.cgroup.layout() is None, reason="no memory cgroup (not root?)")
def test_forked_allocators_share_one_memory_cap(baseline: int) -> None:
    """RLIMIT_AS is per process; the run's memory cgroup caps them all together."""
    limits = sandbox.Limits(memory_mb=128)
    attack = """
import os
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        x = bytearray(100 << 20)
        x[::4096] = b"1" * len(x[::4096])
        os._exit(0)
    kids.append(pid)
print("escaped" if all(os.waitpid(p, 0)[1] == 0 for p in kids) else "contained")
"""
    result = sandbox.run(attack, limits)
    assert result.stdout.strip() == b"contained", result.stderr[-300:]
    assert result.memory_peak_bytes is not None
    assert result.memory_peak_bytes <= limits.group_memory_bytes < 8 * (100 << 20)
    where = sandbox.cgroup.layout()
    assert where is not None and not list(
        where.base.glob(f"{sandbox.cgroup.PREFIX}{os.getpid()}-*")
    )
    assert sandbox_processes() <= baseline


def test_infinite_loop_hits_the_cpu_limit(pool: EnvPool, baseline: int) -> None:
    result = score(pool, solution("while True:\n    pass"), tests=ESCAPED, cpu_limit_s=1)
    assert "CPU time limit" in result.info["failures"][0]
    assert_contained(pool, result, baseline)


def test_100_mb_of_output_is_cut_off(pool: EnvPool, baseline: int) -> None:
    attack = solution("import sys\nsys.stdout.write('x' * (100 << 20))\nprint('escaped')")
    t0 = time.monotonic()
    result = score(pool, attack, tests=ESCAPED)
    assert time.monotonic() - t0 < 3
    assert "output limit" in result.info["failures"][0]
    assert_contained(pool, result, baseline)


def test_killing_the_parent_init_and_worker_fails(pool: EnvPool, baseline: int) -> None:
    worker = pool.pids()[0]
    attack = solution(f"""
import os, signal
hits = 0
for pid in (os.getppid(), 1, {worker}, {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
        hits += 1
    except OSError as e:
        print(pid, type(e).__name__)
print("escaped" if hits == 4 else "contained")
os.kill(-1, signal.SIGKILL)
""")
    result = score(pool, attack, tests=ESCAPED)
    assert pool.pids() == [worker]
    os.kill(worker, 0)  # still there
    assert_contained(pool, result, baseline)


def test_sleeping_past_the_wall_limit_times_out(pool: EnvPool, baseline: int) -> None:
    attack = solution("import time\ntime.sleep(30)\nprint('escaped')")
    t0 = time.monotonic()
    result = score(pool, attack, tests=ESCAPED, wall_limit_s=1)
    assert time.monotonic() - t0 < 3
    assert "timed out" in result.info["failures"][0]
    assert_contained(pool, result, baseline)


def test_a_worker_killed_mid_run_takes_its_sandbox_along(tmp_path: Path, baseline: int) -> None:
    """The pool's timeout kills the worker; bwrap's --die-with-parent ends the sandbox."""
    p = EnvPool(load_manifest(CODE), process_env(CODE), workers=1, timeout_s=1.5, log_dir=tmp_path)
    try:
        [dead] = p.pids()
        sleeper = solution("import time\ntime.sleep(30)\nprint('escaped')")
        [hung] = p.score([Item("", sleeper, {"tests": ESCAPED, "wall_limit_s": 10})])
        assert hung.error_kind == "timeout"
        deadline = time.monotonic() + 5
        while sandbox_processes() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes() <= baseline, "the sandbox outlived its worker"
        [after] = p.score([Item("", SUM, {"tests": SUM_TESTS})])  # a new worker
        assert (after.score, after.error) == (1.0, None) and p.pids() != [dead]
    finally:
        p.close()
    where = sandbox.cgroup.layout()
    if where is not None:  # the new worker swept the dead one's cgroup
        assert not list(where.base.glob(f"{sandbox.cgroup.PREFIX}{dead}-*"))


def test_asserts_cannot_be_skipped_by_exiting(pool: EnvPool) -> None:
    asserts = "assert add(1, 2) == 3"
    hacks = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"]
    results = pool.score([Item("", solution(h), {"asserts": asserts}) for h in hacks])
    assert [(r.score, r.error) for r in results] == [(0.0, None)] * 3


# -- other ways to run it ----------------------------------------------------------------
def test_scores_in_its_own_venv(tmp_path: Path) -> None:
    built = build(CODE, tmp_path / "store")
    assert built.isolated and built.python.startswith(str(tmp_path))
    p = EnvPool(load_manifest(CODE), built, workers=1, log_dir=tmp_path)
    try:
        stdio, asserted = p.score(
            [
                Item("", SUM, {"tests": SUM_TESTS}),
                Item("", "def f():\n    return 1", {"asserts": "assert f() == 1"}),
            ]
        )
    finally:
        p.close()
    assert [(r.score, r.error) for r in (stdio, asserted)] == [(1.0, None)] * 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start an unprivileged caller")
def test_works_for_an_unprivileged_caller() -> None:
    """Without root there is no uid to drop: bwrap runs as the caller, just the same."""
    python = next((p for p in sandbox.SYSTEM_PYTHONS if os.path.exists(p)), None)
    if python is None:
        pytest.skip("no system Python the unprivileged user can run")
    script = (
        f"import sys; sys.path.insert(0, {str(CODE)!r}); import env, sandbox\n"
        "assert sandbox.sandbox_user() is None\n"
        f"print(env.score('', {SUM!r}, tests={SUM_TESTS!r})['score'])\n"
        "shadow = 'print(open(\"/etc/shadow\").read())'\n"
        "print(env.score('', shadow, tests=[{'input': '', 'output': ''}])['score'])"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", python, "-I", "-c", script],
        capture_output=True, text=True, cwd="/", timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "0.0"]
