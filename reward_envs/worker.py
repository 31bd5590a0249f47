"""The worker process that runs an env's code, inside the env's own venv or container.

Standard library only (see ``protocol.py``). Started by the pool as
``python -m caravela_env_worker`` (venv/container; the builder copies this file
and ``protocol.py`` there) or ``python -m reward_envs.worker`` (process isolation):

    --env-dir DIR   the env's source, put first on sys.path
    --entry M:F     module and function to call
    --api KIND      score:  F(prompt, completion, **fields) -> number | {"score", "info"}
                    batch:  F(items: list[dict]) -> list of the above, one per item
                    trl:    F(prompts, completions, **columns) -> list[float]  (TRL's
                            reward-function signature, used as-is; columns are lists)

The protocol owns the real stdout: the env's own prints go to stderr (the
pool's log file), so they cannot corrupt a reply. Scoring runs on the main
thread, so scorers with signal-based timeouts (math-verify) work; the pool's
hard kill is still the guard that always holds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

from .protocol import (
    PROTOCOL_VERSION,
    Hello,
    Item,
    ItemResult,
    ProtocolError,
    ScoreReply,
    ScoreRequest,
    check_value,
    decode,
    encode,
)


def _error(e: BaseException) -> ItemResult:
    tb = traceback.format_exception_only(type(e), e)[-1].strip()
    return ItemResult(None, tb[:2000], "exception")


def _many(values: Any, n: int) -> list[ItemResult]:
    if not isinstance(values, list | tuple) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list | tuple) else repr(values)[:200]
        return [ItemResult(None, f"bad return value: {got} for {n} items", "bad_value")] * n
    return [check_value(v) for v in values]


def score_items(fn: Callable[..., Any], api: str, items: list[Item]) -> list[ItemResult]:
    """Call the env's function the way its ``api`` says; every failure becomes a result."""
    if api == "score":
        out = []
        for it in items:
            try:
                out.append(check_value(fn(it.prompt, it.completion, **it.fields)))
            except Exception as e:  # noqa: BLE001 - env bugs are results, not crashes
                out.append(_error(e))
        return out
    try:
        if api == "batch":
            rows = [{"prompt": i.prompt, "completion": i.completion, **i.fields} for i in items]
            values = fn(rows)
        else:
            columns = sorted({k for i in items for k in i.fields})
            kwargs = {k: [i.fields.get(k) for i in items] for k in columns}
            values = fn(
                prompts=[i.prompt for i in items],
                completions=[i.completion for i in items],
                **kwargs,
            )
    except Exception as e:  # noqa: BLE001
        return [_error(e)] * len(items)
    return _many(values, len(items))


def _encodable(r: ItemResult) -> ItemResult:
    try:
        encode(ScoreReply(0, [r]))
        return r
    except (TypeError, ValueError) as e:  # info holding something JSON cannot carry
        return ItemResult(None, f"bad return value: info is not JSON ({e})", "bad_value")


def _send(out: BinaryIO, msg: Hello | ScoreReply) -> None:
    if isinstance(msg, ScoreReply):
        msg = ScoreReply(msg.seq, [_encodable(r) for r in msg.results])
    out.write(encode(msg))
    out.flush()


def _exit_with_parent(interval: float = 1.0) -> None:
    """Exit when the pool that started this worker is gone. An idle worker sees stdin close;
    one stuck in a hung scorer never reads it again and would outlive a killed pool."""
    import threading
    import time

    parent = os.getppid()
    if parent <= 1:  # started by init (a container's entry point): nothing to watch
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caravela_env_worker")
    p.add_argument("--env-dir", required=True)
    p.add_argument("--entry", required=True)
    p.add_argument("--api", choices=["score", "batch", "trl"], default="score")
    args = p.parse_args(argv)

    _exit_with_parent()
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the env's prints now land in stderr
    sys.stdout = sys.stderr
    module_name, _, fn_name = args.entry.partition(":")
    sys.path.insert(0, os.path.abspath(args.env_dir))
    error = None
    fn: Callable[..., Any] | None = None
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
        if not callable(fn):
            error = f"{args.entry} is not callable"
    except Exception as e:  # noqa: BLE001 - reported to the pool, which names the env
        error = f"cannot import {args.entry} from {args.env_dir}: {type(e).__name__}: {e}"
    _send(proto_out, Hello(PROTOCOL_VERSION, os.getpid(), sys.version.split()[0], error))
    if error is not None or fn is None:
        return 1
    for line in sys.stdin.buffer:
        request = decode(line)
        if not isinstance(request, ScoreRequest):
            raise ProtocolError(f"worker expected a ScoreRequest, got {type(request).__name__}")
        _send(proto_out, ScoreReply(request.seq, score_items(fn, args.api, request.items)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
