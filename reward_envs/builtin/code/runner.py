"""The program that runs *inside* the sandbox, as its pid 1, around the model's solution.

``sandbox.py`` passes this file's text to the sandboxed Python with ``-c`` and these
arguments (``env.py`` imports it only for ``encode``/``decode``, the wire format)::

    MODE SOLUTION JOBS_FD REPORT_FD CPU_S MEMORY_BYTES PROCESSES FILE_BYTES OPEN_FILES

It sets the resource limits on itself, soft and hard (so ``RLIMIT_NPROC`` counts the
processes of the sandbox's own user namespace, see ``sandbox.py``), writes ``ready`` to
``REPORT_FD`` (the env's proof that the sandbox came up: a solution can make itself fail,
never make the sandbox look broken), then, by ``MODE``:

* ``stdio``: closes ``REPORT_FD`` and runs the solution file as ``__main__`` itself,
  stdin/stdout as given. The solution is then the sandbox's pid 1 (bwrap ``--as-pid-1``):
  no bwrap init without limits or seccomp filter shares the sandbox, and no process of
  ours is there to attack. As pid 1 it ignores the signals it has no handler for sent from
  inside the sandbox (so the CPU limit is a SIGKILL, soft = hard, and a write past the
  file size limit fails with ``EFBIG`` rather than SIGXFSZ).
* ``judge``: this process is the *judge*. It makes itself non-dumpable
  (``prctl(PR_SET_DUMPABLE, 0)``: its memory, fds and environment become unreachable
  through ``/proc`` to the other processes of the sandbox's uid; ``ptrace`` and
  ``process_vm_readv`` are denied by seccomp anyway), then forks the *solver*, which
  closes ``JOBS_FD`` and ``REPORT_FD``, runs the solution as ``__main__`` and then only
  answers requests on a pipe: call this object with these arguments, get this attribute.
  After the fork the judge reads its jobs from ``JOBS_FD``: the test code, which never
  enters the solver's memory. It runs each job in a namespace where the solution's names
  are ``Remote`` proxies, and reports each on ``REPORT_FD`` (which the solver has no
  reference to): the value of an ``eval`` job (a plain value, or "opaque" for anything
  else), or whether an ``exec`` job ran. As pid 1 it cannot be killed or stopped from
  inside (it ignores SIGINT, the one signal Python handles).

Values cross the pipes in a strict format (``encode``/``decode``): None, bool, int, float,
str, bytes, list, tuple, set, frozenset and dict of those, checked with ``type(x) is``, so
no subclass (an ``int`` whose ``__eq__`` is always true) passes as a plain value; any other
object of the solver crosses as a reference (``Remote`` on the judge's side), which
compares equal only to itself. Standard library only, and few imports (each costs every run).
"""

from __future__ import annotations  # annotations are never evaluated: no typing import

import builtins
import os
import resource
import sys

MYPY = False
if MYPY:  # for the type checker only: importing typing would cost every run ~3 ms
    from collections.abc import Callable
    from typing import Any

_write = os.write  # bound now: the solution may monkeypatch the os module later
MAX_FRAME = 64 << 20
"""Largest message the judge takes from the solver."""
MAX_DEPTH = 100
"""Deepest nesting of a decoded value."""
PR_SET_DUMPABLE = 4


# -- the wire format ----------------------------------------------------------------------
def encode(value: Any, ref: Callable[[Any], int] | None = None) -> bytes:
    """``value`` in the strict format; ``ref(obj) -> int`` names any other object (else
    TypeError)."""
    out: list[bytes] = []
    _encode(value, out, ref)
    return b"".join(out)


def _encode(v: Any, out: list[bytes], ref: Callable[[Any], int] | None) -> None:
    t = type(v)
    if v is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif t is int:
        out.append(b"i%x;" % v)
    elif t is float:
        out.append(b"f%s;" % repr(v).encode())
    elif t is str or t is bytes:
        data = v.encode("utf-8", "surrogatepass") if t is str else v
        out.append(b"%s%d:" % (b"s" if t is str else b"b", len(data)))
        out.append(data)
    elif t is list or t is tuple or t is set or t is frozenset:
        tag = b"l" if t is list else b"t" if t is tuple else b"S" if t is set else b"z"
        out.append(b"%s%d:" % (tag, len(v)))
        for item in v:
            _encode(item, out, ref)
    elif t is dict:
        out.append(b"d%d:" % len(v))
        for key, item in v.items():
            _encode(key, out, ref)
            _encode(item, out, ref)
    elif ref is not None:
        out.append(b"R%d;" % ref(v))
    else:
        raise TypeError(f"not a plain value: {t.__name__}")


def decode(data: bytes, ref: Callable[[int], Any] | None = None) -> Any:
    """The value ``encode`` wrote; ``ref(int)`` makes a reference's value (else ValueError).
    Any malformed input raises ValueError."""
    try:
        value, end = _decode(data, 0, ref, 0)
    except (IndexError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed value: {type(e).__name__}") from None
    if end != len(data):
        raise ValueError("malformed value: trailing bytes")
    return value


def _until(data: bytes, pos: int, stop: bytes) -> tuple[bytes, int]:
    end = data.find(stop, pos)
    if end < 0:
        raise ValueError("malformed value: unterminated")
    return data[pos:end], end + 1


def _decode(data: bytes, pos: int, ref: Callable[[int], Any] | None, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ValueError("malformed value: nested too deep")
    tag = data[pos : pos + 1]
    pos += 1
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], pos
    if tag in (b"i", b"f", b"R"):
        text, pos = _until(data, pos, b";")
        if tag == b"i":
            return int(text, 16), pos
        if tag == b"f":
            return float(text), pos
        if ref is None:
            raise ValueError("malformed value: a reference where none may be")
        return ref(int(text)), pos
    count_text, pos = _until(data, pos, b":")
    count = int(count_text)
    if count < 0:
        raise ValueError("malformed value: negative length")
    if tag in (b"s", b"b"):
        if pos + count > len(data):
            raise ValueError("malformed value: truncated")
        chunk = data[pos : pos + count]
        return (chunk.decode("utf-8", "surrogatepass") if tag == b"s" else chunk), pos + count
    if tag in (b"l", b"t", b"d", b"S", b"z"):
        items = []
        for _ in range(count * (2 if tag == b"d" else 1)):
            item, pos = _decode(data, pos, ref, depth + 1)
            items.append(item)
        if tag == b"d":
            return dict(zip(items[::2], items[1::2], strict=True)), pos
        kind = {b"l": list, b"t": tuple, b"S": set, b"z": frozenset}[tag]
        return (items if kind is list else kind(items)), pos
    raise ValueError(f"malformed value: tag {tag!r}")


def send(fd: int, payload: bytes) -> None:
    view = memoryview(b"%d\n" % len(payload) + payload)
    while view:
        view = view[_write(fd, view) :]


class Reader:
    """Length-prefixed messages from one fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def _fill(self) -> bool:
        chunk = os.read(self.fd, 1 << 16)
        self.buf += chunk
        return bool(chunk)

    def receive(self) -> bytes | None:
        """The next message, or None at end of file."""
        while b"\n" not in self.buf[:20]:
            if len(self.buf) >= 20 or not self._fill():
                return None if not self.buf else self._bad()
        head, _, self.buf = self.buf.partition(b"\n")
        size = int(head) if head.isdigit() else self._bad()
        if size > MAX_FRAME:
            self._bad()
        while len(self.buf) < size:
            if not self._fill():
                return None
        payload, self.buf = self.buf[:size], self.buf[size:]
        return payload

    def _bad(self) -> Any:
        raise ValueError("malformed message from the solution's process")


# -- both modes ---------------------------------------------------------------------------
def set_limits(cpu_s: int, memory: int, processes: int, file_bytes: int, files: int) -> None:
    """Lower every limit, soft and hard: nothing in the sandbox can raise them again.
    The CPU limit is a SIGKILL (soft = hard): pid 1 ignores SIGXCPU."""
    pairs = {
        resource.RLIMIT_CPU: (cpu_s, cpu_s),
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_NPROC: (processes, processes),
        resource.RLIMIT_FSIZE: (file_bytes, file_bytes),
        resource.RLIMIT_NOFILE: (files, files),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, pair in pairs.items():
        resource.setrlimit(which, pair)


def main_module(path: str) -> dict[str, Any]:
    """A fresh ``__main__`` module for the solution (what ``python path`` would give it)."""
    module = type(sys)("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    return module.__dict__


def run_file(path: str, namespace: dict[str, Any]) -> None:
    with open(path, "rb") as f:
        source = f.read()
    exec(compile(source, path, "exec"), namespace)


def one_line(e: BaseException) -> str:
    """``Type: message`` on one short line, whatever the exception's ``__str__`` does."""
    try:
        message = str(e)
        text = f"{type(e).__name__}: {message}" if message else type(e).__name__
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = "exception"
    return " ".join(text.split())[:200]


# -- the solver (the solution's process) ----------------------------------------------------
def solver(solution: str, requests: int, replies: int) -> None:
    """Run the solution, then answer the judge until it closes the pipe."""
    objects: dict[int, Any] = {}

    def ref(obj: Any) -> int:
        objects[id(obj)] = obj  # kept alive: ids stay unique
        return id(obj)

    namespace = main_module(solution)
    try:
        run_file(solution, namespace)
    except BaseException as e:  # noqa: BLE001 - includes SystemExit: no test can run
        send(replies, encode(("setup", one_line(e))))
        return
    modules = type(sys)
    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__") or hasattr(builtins, name):
            continue  # a solution never shadows the judge's builtins
        if type(value) is modules and getattr(value, "__name__", None) in sys.stdlib_module_names:
            names[name] = ("module", value.__name__)
        else:
            names[name] = ("value", value)
    send(replies, encode(("names", names), ref))
    reader = Reader(requests)
    while (message := reader.receive()) is not None:
        try:
            op, target, *rest = decode(message, objects.__getitem__)
            result = serve(op, target, rest)
            reply = encode(("ok", result), ref)
        except BaseException as e:  # noqa: BLE001 - reported to the judge
            reply = encode(("error", type(e).__name__, one_line(e)))
        send(replies, reply)


def serve(op: str, target: Any, rest: list[Any]) -> Any:
    if op == "call":
        args, kwargs = rest
        return target(*args, **kwargs)
    if op == "getattr":
        return getattr(target, rest[0])
    if op == "getitem":
        return target[rest[0]]
    if op == "list":
        return list(target)
    if op == "len":
        return len(target)
    raise ValueError(f"unknown request {op!r}")


# -- the judge ----------------------------------------------------------------------------
class RemoteError(Exception):
    """The solution raised an exception that has no builtin name."""


class Channel:
    """The judge's end of the pipes to the solver."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests = requests
        self.reader = Reader(replies)

    def receive(self) -> Any:
        message = self.reader.receive()
        if message is None:
            raise RemoteError("the solution's process exited")
        return decode(message, lambda n: Remote(self, n))

    def request(self, op: str, *args: Any) -> Any:
        try:
            send(self.requests, encode((op, *args), remote_id))
        except BrokenPipeError:
            raise RemoteError("the solution's process exited") from None
        reply = self.receive()
        if type(reply) is not tuple or not reply:
            raise RemoteError("malformed reply from the solution's process")
        if reply[0] == "ok" and len(reply) == 2:
            return reply[1]
        kind: Any = getattr(builtins, str(reply[1]), None) if len(reply) == 3 else None
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RemoteError  # the solution's own exception type, or no name at all
        raise kind(str(reply[2]) if len(reply) == 3 else "?")


def remote_id(obj: Any) -> int:
    if type(obj) is Remote:
        return obj._id
    raise TypeError(
        f"cannot pass a {type(obj).__name__} to the solution: only None, bool, int, float, "
        "str, bytes, list, tuple, set, frozenset, dict and the solution's own objects"
    )


class Remote:
    """An object of the solution, on the judge's side: calls, attributes, items, ``len``
    and iteration go to the solver; it is equal only to itself."""

    __slots__ = ("_channel", "_id")

    def __init__(self, channel: Channel, n: int) -> None:
        self._channel = channel
        self._id = n

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.request("call", self, list(args), kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._channel.request("getattr", self, name)

    def __getitem__(self, key: Any) -> Any:
        return self._channel.request("getitem", self, key)

    def __len__(self) -> int:
        n = self._channel.request("len", self)
        if type(n) is not int or n < 0:
            raise TypeError("len() of the solution's object is not a non-negative int")
        return n

    def __iter__(self) -> Any:
        items = self._channel.request("list", self)
        if type(items) is not list:
            raise TypeError("the solution's object did not iterate to a list")
        return iter(items)

    def __repr__(self) -> str:
        return f"<the solution's object #{self._id}>"


def report(fd: int, record: tuple[Any, ...]) -> None:
    send(fd, encode(record))


def undumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``: this process's ``/proc`` entries (memory, fds)
    become unreachable to the other processes of the sandbox's uid."""
    import _ctypes  # ~1 ms, where ctypes itself would take ~5

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL
        _restype_ = Int

    prctl = Function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))  # type: ignore[arg-type]
    if prctl(Int(PR_SET_DUMPABLE), Int(0), Int(0), Int(0), Int(0)) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE, 0) failed")


def bind_names(channel: Channel, namespace: dict[str, Any]) -> str | None:
    """Bind the names the solver reports in ``namespace``; why not, if it failed."""
    try:
        first = channel.receive()
    except (RemoteError, ValueError) as e:
        return one_line(e)
    if type(first) is tuple and len(first) == 2 and first[0] == "setup":
        return str(first[1])
    if type(first) is not tuple or len(first) != 2 or type(first[1]) is not dict:
        return "malformed message from the solution's process"
    for name, entry in first[1].items():
        if type(name) is not str or type(entry) is not tuple or len(entry) != 2:
            return "malformed message from the solution's process"
        if name.startswith("__") or hasattr(builtins, name):
            continue  # the solver may lie: it never binds a builtin the tests rely on
        kind, value = entry
        module = value if kind == "module" and type(value) is str else name
        if module in sys.stdlib_module_names:  # a stdlib module's name is the judge's copy
            __import__(module)
            value = sys.modules[module]
        namespace[name] = value
    return None


def judge(jobs_fd: int, report_fd: int, channel: Channel) -> None:
    """Run the jobs against the solver, reporting each on ``report_fd``."""
    with os.fdopen(jobs_fd, "rb") as f:
        jobs = decode(f.read())
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    why = bind_names(channel, namespace)
    if why is not None:
        report(report_fd, ("setup", why))
        return
    for index, kind, source in jobs:
        record: tuple[Any, ...]
        try:
            code = compile(source, f"<test {index}>", kind)
            if kind == "eval":
                value = eval(code, namespace)
                try:
                    record = (index, "value", encode(value))
                except TypeError:
                    record = (index, "opaque", type(value).__name__)
            else:
                exec(code, namespace)
                record = (index, "ok")
        except BaseException as e:  # noqa: BLE001 - the test failed
            record = (index, "fail", one_line(e))
        report(report_fd, record)


def main() -> None:
    mode, solution, jobs_arg, report_arg, cpu_s, memory, processes, *limits = sys.argv[1:]
    # the runner's own process does not count against the solution's processes
    set_limits(int(cpu_s), int(memory), int(processes) + 1, *(int(x) for x in limits))
    report_fd = int(report_arg)
    _write(report_fd, b"ready")
    if mode == "stdio":  # the solution is pid 1 itself: no process of ours to protect
        os.close(report_fd)
        run_file(solution, main_module(solution))
        return  # the interpreter exits as ``python solution.py`` would
    undumpable()  # before the fork: the solver starts non-dumpable too, with no window
    # pid 1 ignores the signals it has no handler for when they come from inside its
    # namespace; Python's only one is SIGINT's: ignored here, restored in the solver
    import _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    jobs = int(jobs_arg)
    requests, to_solver = os.pipe()
    from_solver, replies = os.pipe()
    child = os.fork()
    if child == 0:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        for fd in (jobs, report_fd, to_solver, from_solver):
            os.close(fd)
        try:
            solver(solution, requests, replies)
        finally:
            os._exit(0)
    os.close(requests)
    os.close(replies)
    judge(jobs, report_fd, Channel(to_solver, from_solver))
    os.close(report_fd)
    os._exit(0)  # pid 1 exits: the kernel kills the solver and all it started


if __name__ == "__main__":
    main()
