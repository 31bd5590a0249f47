"""The program that runs *inside* the sandbox, before and around the model's solution.

Never imported by the env: ``sandbox.py`` passes this file's text to the sandboxed Python
with ``-c``, and these arguments::

    MODE SOLUTION STATEMENTS READY_FD CPU_S MEMORY_BYTES PROCESSES FILE_BYTES OPEN_FILES

It sets the resource limits on itself, soft and hard (so ``RLIMIT_NPROC`` counts the
processes of the sandbox's own user namespace, see ``sandbox.py``), writes ``ready`` to
``READY_FD`` and closes it (the env's proof that the sandbox came up: a solution can make
itself fail, never make the sandbox look broken), then, by ``MODE``:

* ``stdio``: runs the solution file as ``__main__``, stdin/stdout as given.
* ``asserts``: reads a secret nonce from stdin (a pipe, so the solution cannot re-read
  it), runs the solution as ``__main__``, then each statement of the ``STATEMENTS`` file
  (NUL-separated sources; source code holds no NUL) in the solution's namespace, and
  reports each on stdout as ``<nonce> <index> ok`` or ``<nonce> <index> fail <reason>``
  (``setup`` for the solution itself). A solution that exits early (``sys.exit``,
  ``os._exit``) leaves its statements unreported: failed.

Standard library only, and few imports (each costs every run; ``json`` and ``runpy``
would add ~8 ms): runs under whatever Python the sandbox was given.
"""

import os
import resource
import sys

_write = os.write  # bound now: the solution may monkeypatch the os module later


def set_limits(cpu_s: int, memory: int, processes: int, file_bytes: int, files: int) -> None:
    """Lower every limit, soft and hard: nothing in the sandbox can raise them again."""
    pairs = {
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),  # SIGXCPU, then SIGKILL a second later
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_NPROC: (processes, processes),
        resource.RLIMIT_FSIZE: (file_bytes, file_bytes),
        resource.RLIMIT_NOFILE: (files, files),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, pair in pairs.items():
        resource.setrlimit(which, pair)


def main_module(path: str) -> dict[str, object]:
    """A fresh ``__main__`` module for the solution (what ``python path`` would give it)."""
    module = type(sys)("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    return module.__dict__


def run_file(path: str, namespace: dict[str, object]) -> None:
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


def report(nonce: str, index: str, outcome: str) -> None:
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - the solution may have replaced sys.stdout
        pass
    _write(1, f"\n{nonce} {index} {outcome}\n".encode())


def run_asserts(solution: str, statements_path: str) -> None:
    nonce = sys.stdin.read().strip()
    with open(statements_path) as f:
        statements = f.read().split("\0")
    namespace = main_module(solution)
    try:
        run_file(solution, namespace)
    except BaseException as e:  # noqa: BLE001 - includes SystemExit: the asserts never ran
        report(nonce, "setup", "fail " + one_line(e))
        return
    for i, source in enumerate(statements):
        try:
            exec(compile(source, f"<test {i}>", "exec"), namespace)
        except BaseException as e:  # noqa: BLE001
            report(nonce, str(i), "fail " + one_line(e))
        else:
            report(nonce, str(i), "ok")


def main() -> None:
    mode, solution, statements, ready, *limits = sys.argv[1:]
    set_limits(*(int(x) for x in limits))
    _write(int(ready), b"ready")
    os.close(int(ready))
    if mode == "stdio":
        run_file(solution, main_module(solution))
    else:
        run_asserts(solution, statements)


if __name__ == "__main__":
    main()
