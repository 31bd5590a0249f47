"""The ``code`` env against solutions that try to pass without solving the task.

Each attack is a real completion scored through the real env (an ``EnvPool`` worker, real
bwrap): it must score 0 as a failed test, never an error. The expected values are numbers
no solution would guess (``SECRET``), so an attack passes only if it learned the value or
forged the verdict. Before the judge/solver split and the seccomp filter (issue 17) all
of these passed except the honest ones, which must keep passing. Needs ``bwrap``.
Run it inside a loopback-only network namespace, like ``test_code_sandbox.py``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reward_envs.builder import process_env
from reward_envs.builtin.code import env as code_env
from reward_envs.builtin.code import runner, sandbox
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item, RewardResult

CODE = Path(code_env.__file__).resolve().parent
SECRET = 831629
SPLIT = f"assert f(3) == {SECRET}"
"""A splittable assert: ``f(3)`` runs in the sandbox, the comparison in the env."""
REVERSED = f"assert {SECRET} == f(3)"
WHOLE = f"def check(candidate):\n    assert candidate(3) == {SECRET}\n\ncheck(f)"
"""An assert that cannot be split: it runs whole in the judge process."""
ESCAPED = [{"input": "", "output": "escaped"}]

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bwrap")


def solution(body: str) -> str:
    return f"My solution:\n```python\n{body.strip()}\n```\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvPool]:
    p = EnvPool(
        load_manifest(CODE), process_env(CODE), workers=1, log_dir=tmp_path_factory.mktemp("logs")
    )
    yield p
    p.close()


def scores(pool: EnvPool, completion: str, *asserts: str) -> list[RewardResult]:
    """One item per asserts block, all with the same completion."""
    return pool.score([Item("", completion, {"asserts": a}) for a in asserts])


def assert_failed(results: list[RewardResult]) -> None:
    for r in results:
        assert r.error is None, r.error
        assert r.score == 0.0 and r.info["passed"] == 0, r.info


# -- learning the expected value -------------------------------------------------------------
def test_reading_the_asserts_from_files_fails(pool: EnvPool) -> None:
    attack = solution(r"""
import os, re
found = []
for root in ("/tmp", os.getcwd(), "/proc/self/fd", "/proc/1/fd", "/proc/1", "/dev/shm"):
    try:
        names = os.listdir(root)
    except OSError:
        continue
    for name in names:
        try:
            with open(os.path.join(root, name), "rb") as fh:
                found += re.findall(rb"== *(\d+)", fh.read(1 << 20))
        except OSError:
            pass

def f(x):
    return int(found[0]) if found else -1
""")
    assert_failed(scores(pool, attack, SPLIT, WHOLE))


def test_walking_frames_for_the_asserts_fails(pool: EnvPool) -> None:
    attack = solution(r"""
import gc, re, sys

def f(x):
    texts = []
    frame = sys._getframe(1)
    while frame is not None:
        for value in [*frame.f_locals.values(), *frame.f_globals.values()]:
            texts += value if isinstance(value, list) else [value]
        frame = frame.f_back
    texts += gc.get_objects()  # every object of this process
    for text in texts:
        if isinstance(text, (str, bytes)):
            text = text.decode("latin-1") if isinstance(text, bytes) else text
            if "f(3)" not in text:
                continue
            m = re.search(r"== *(\d+)", text)
            if m:
                return int(m.group(1))
    return -1
""")
    assert_failed(scores(pool, attack, SPLIT, WHOLE))


# -- forging the verdict ---------------------------------------------------------------------
def test_replacing_builtins_compile_fails(pool: EnvPool) -> None:
    attack = solution("""
import builtins
_compile = builtins.compile

def compile(source, filename, mode, *args, **kwargs):
    return _compile("pass" if mode == "exec" else "True", filename, mode, *args, **kwargs)

builtins.compile = compile

def f(x):
    return -1
""")
    assert_failed(scores(pool, attack, SPLIT, WHOLE))


def test_wrapping_the_report_function_fails(pool: EnvPool) -> None:
    """Every report-like function of the runner, in every frame's globals, is made to
    say the test passed."""
    attack = solution("""
import sys

def forge(original):
    def forged(*args):
        args = list(args)
        for i, arg in enumerate(args):
            if isinstance(arg, str) and arg.startswith("fail"):
                args[i] = "ok"
        return original(*args)
    return forged

frame = sys._getframe()
while frame is not None:
    g = frame.f_globals
    if g is not globals():
        for name in ("report", "send", "_write"):
            if callable(g.get(name)):
                g[name] = forge(g[name])
    frame = frame.f_back

def f(x):
    return -1
""")
    assert_failed(scores(pool, attack, SPLIT, WHOLE))


def test_shadowing_the_builtins_and_modules_the_asserts_use_fails(pool: EnvPool) -> None:
    """The solution's ``abs`` and ``math`` (sent past the solver's own filter, which the
    solution disabled) never replace the judge's."""
    attack = solution("""
import builtins, sys

def abs(x):
    return 0

class math:
    @staticmethod
    def isclose(*args, **kwargs):
        return True

builtins.hasattr = lambda obj, name: False  # the solver's filter now lets all through
sys.stdlib_module_names = frozenset()

def f(x):
    return -1
""")
    assert_failed(
        scores(
            pool,
            attack,
            f"assert abs(f(3) - {SECRET}) < 1e-9",
            f"assert math.isclose(f(3), {SECRET})",
        )
    )


# -- values posing as the expected one -------------------------------------------------------
def test_an_always_equal_object_fails(pool: EnvPool) -> None:
    attack = solution("""
class Anything:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__

def f(x):
    return Anything()
""")
    assert_failed(
        scores(pool, attack, SPLIT, REVERSED, WHOLE, "assert f(3)", "assert f(3) == f(4)")
    )


@pytest.mark.parametrize("base", ["int", "str", "list"])
def test_a_subclass_posing_as_the_value_fails(pool: EnvPool, base: str) -> None:
    attack = solution(f"""
class Posing({base}):
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = {base}.__hash__

def f(x):
    return Posing()
""")
    assert_failed(
        scores(pool, attack, SPLIT, REVERSED, WHOLE, "assert isinstance(f(3), " + base + ")")
    )


# -- reaching into other processes -----------------------------------------------------------
PTRACE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)

class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def reached(pid):
    "How this process reached into ``pid``: a list of what worked."
    wins = []
    if libc.ptrace(0x4206, pid, 0, 0) == 0:  # PTRACE_SEIZE
        wins.append("ptrace")
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
    for path, mode in ((f"/proc/{pid}/mem", "r+b"), (f"/proc/{pid}/environ", "rb")):
        try:
            with open(path, mode):
                wins.append(path)
        except OSError:
            pass
    try:  # a forked process shares its parent's layout: our own maps name its addresses
        maps = open(f"/proc/{pid}/maps").read()
    except OSError:
        maps = open("/proc/self/maps").read()
    buf = ctypes.create_string_buffer(64)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = iovec(int(maps.split("-", 1)[0], 16), 64)
    libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                      ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) > 0:
        wins.append("process_vm_readv")
    return wins

others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
wins = [(pid, how) for pid in others for how in reached(pid)]
"""


def test_ptrace_and_process_vm_readv_of_the_sandbox_init_fail(pool: EnvPool) -> None:
    """Every other process the solution can see: none with stdin/stdout tests (the
    solution is pid 1 itself; before, bwrap's init was, without limits), the judge (pid 1)
    with asserts. Seccomp denies ``ptrace`` and ``process_vm_readv``; the judge is not
    dumpable, so its ``/proc/1/mem`` and ``environ`` do not open either."""
    stdio = solution(PTRACE + "\nprint('escaped' if wins else f'contained {wins}')")
    judged = solution(PTRACE + f"\ndef f(x):\n    return {SECRET} if wins else wins")
    [printed] = pool.score([Item("", stdio, {"tests": ESCAPED})])
    assert_failed([printed, *scores(pool, judged, SPLIT, WHOLE)])
    assert "contained []" in printed.info["failures"][0], printed.info


def test_seccomp_denies_namespace_keyring_bpf_and_perf_calls(pool: EnvPool) -> None:
    attack = solution("""
import ctypes, errno, platform
libc = ctypes.CDLL(None, use_errno=True)
numbers = {  # x86_64, aarch64
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "keyctl": (250, 219),
    "bpf": (321, 280), "perf_event_open": (298, 241), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
}
column = 0 if platform.machine() == "x86_64" else 1
allowed = []
for name, nrs in numbers.items():
    ctypes.set_errno(0)
    result = libc.syscall(nrs[column], 0, 0, 0, 0, 0, 0)
    if not (result == -1 and ctypes.get_errno() == errno.EPERM):
        allowed.append((name, result, ctypes.get_errno()))
print("escaped" if allowed else f"contained {allowed}")
""")
    [result] = pool.score([Item("", attack, {"tests": ESCAPED})])
    assert_failed([result])
    assert "contained []" in result.info["failures"][0], result.info


@pytest.mark.skipif(sandbox.cgroup.cpu_layout() is None, reason="no CPU cgroup (not root?)")
def test_a_run_gets_at_most_its_cpus() -> None:
    """Four busy processes for 1.5 s under ``cpus=0.05`` (a quota below what they get
    even on a loaded machine) use at most 5% of a core, and are throttled."""
    limits = sandbox.Limits(cpus=0.05, wall_s=8)
    busy = """
import os, time
def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        spin(1.5)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
t = os.times()
print(t.children_user + t.children_system)
"""
    result = sandbox.run(busy, limits)
    assert result.returncode == 0, result.stderr[-300:]
    used = float(result.stdout)
    assert used <= 0.05 * result.seconds + 0.05, (used, result.seconds)
    assert result.cpu_throttled_s is not None and result.cpu_throttled_s > 0


def test_the_judge_outlives_the_solutions_signals(pool: EnvPool) -> None:
    """pid 1 ignores signals from inside its namespace: a solution that tries to kill or
    stop the judge still has its (correct) function judged."""
    signals = solution("""
import os, signal
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    os.kill(1, sig)

def f(x):
    return x * x
""")
    [r] = scores(pool, signals, "assert f(3) == 9")
    assert (r.score, r.error) == (1.0, None), r.info


# -- honest solutions still pass ---------------------------------------------------------------
HONEST = solution("""
import math

def f(x):
    return x * x

def split(s, sep=","):
    return tuple(s.split(sep))

def stats(xs):
    return {"mean": sum(xs) / len(xs), "max": max(xs), "none": None, "raw": bytes(xs)}

def root(x):
    if x < 0:
        raise ValueError("negative")
    return math.sqrt(x)

def evens(n):
    yield from range(0, n, 2)

class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, n in enumerate(nums):
            if target - n in seen:
                return [seen[target - n], i]
            seen[n] = i

print("noise on stdout")
if __name__ == "__main__":
    import sys
    data = sys.stdin.read()
    if data:
        print(f(int(data)))
""")
HONEST_ASSERTS = [
    "assert f(3) == 9\nassert 9 == f(3)\nassert f(-2) != 3\nassert 0 < f(1) <= 1",
    "assert split('a,b') == ('a', 'b')\nassert split('a;b', sep=';') == ('a', 'b')",
    "assert stats([1, 2]) == {'mean': 1.5, 'max': 2, 'none': None, 'raw': b'\\x01\\x02'}",
    "assert abs(root(2) - 1.41421356) < 1e-6\nassert f(2) is not None\nassert not f(0)",
    "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
    "assert list(evens(5)) == [0, 2, 4]",
    "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]",
    "def check(candidate):\n    assert candidate(4) == 16\n    assert candidate(5) == 25\n"
    "\ncheck(f)",
    "import math\nexpected = [f(i) for i in range(4)]\nassert expected == [0, 1, 4, 9]",
    "assert f(3) in (9, 10)\nassert 'b' in split('a,b')\nassert math.floor(root(10)) == 3",
    "assert set(split('a,b')) == {'a', 'b'}\nassert frozenset(f(i) for i in (1, -1)) == {1}",
    "import collections\nassert type(f(3)) == int\nassert isinstance(split('a'), tuple)\n"
    "assert collections.Counter(split('a,b,a')) == collections.Counter(a=2, b=1)",
]


def test_honest_solutions_still_pass(pool: EnvPool) -> None:
    results = pool.score(
        [Item("", HONEST, {"asserts": a}) for a in HONEST_ASSERTS]
        + [Item("", HONEST, {"tests": [{"input": "7", "output": "noise on stdout\n49"}]})]
    )
    for block, r in zip([*HONEST_ASSERTS, "stdio"], results, strict=True):
        assert (r.score, r.error) == (1.0, None), (block, r.info, r.error)


def test_wrong_and_crashing_solutions_fail_with_reasons(pool: EnvPool) -> None:
    wrong, crash, opaque = pool.score(
        [
            Item("", solution("def f(x):\n    return x + x"), {"asserts": SPLIT}),
            Item("", solution("def f(x):\n    return 1 / 0"), {"asserts": SPLIT}),
            Item("", solution("def f(x):\n    return 1j"), {"asserts": SPLIT}),
        ]
    )
    assert_failed([wrong, crash, opaque])
    assert wrong.info["failures"] == [f"{SPLIT}: AssertionError: got 6"]
    assert "ZeroDivisionError" in crash.info["failures"][0]
    assert "not a plain" in opaque.info["failures"][0]


def test_the_wire_format_is_strict() -> None:
    plain: list[object] = [
        None,
        True,
        0,
        -(2**200),
        1.5,
        float("inf"),
        "é\udc80",
        b"\0",
        [1, (2,)],
        {3: []},
        {4},
        frozenset({(5,)}),
    ]
    assert runner.decode(runner.encode(plain)) == plain
    for posing in (type("I", (int,), {})(1), type("S", (str,), {})("x"), 1j, object()):
        with pytest.raises(TypeError, match="not a plain value"):
            runner.encode([posing])
    for bad in (b"l2:N", b"s5:ab", b"x", b"i12", b"l1:" * 200 + b"N", b"NN", b"d1:l0:N"):
        with pytest.raises(ValueError, match="malformed"):
            runner.decode(bad)


def test_the_asserts_are_split_outside_the_sandbox() -> None:
    statements, jobs = code_env.split_asserts(
        f"import math\nassert f(3) == {SECRET}\nassert not g(1)\n{WHOLE}"
    )
    assert [kind for _, kind, _ in jobs] == ["exec", "eval", "eval", "exec", "exec"]
    assert all(str(SECRET) not in source for _, kind, source in jobs if kind == "eval")
    assert statements[1].operands == ((False, 1), (True, SECRET))
    assert statements[2].negate and [st.is_test for st in statements] == [
        False, True, True, False, False
    ]  # fmt: skip


def test_nothing_is_left_behind(pool: EnvPool) -> None:
    """The judge's sandbox goes away whole, like any other."""
    uid = sandbox.NOBODY if os.geteuid() == 0 else os.getuid()

    def count() -> int:
        n = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                n += os.stat(f"/proc/{pid}").st_uid == uid
            except FileNotFoundError:
                pass
        return n

    before = count()
    sleeper = solution("import os, time\nos.fork()\ntime.sleep(30)\ndef f(x):\n    return 9")
    [r] = pool.score([Item("", sleeper, {"asserts": SPLIT, "wall_limit_s": 1})])
    assert r.error is None and "timed out" in r.info["failures"][0]
    deadline = time.monotonic() + 5
    while count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() <= before
