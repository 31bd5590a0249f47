"""Wire protocol between an env pool and its worker processes: JSON lines over pipes.

Standard library only: the worker imports this module *inside the env's own
venv or container*, where nothing of Caravela is installed but this file and
``worker.py`` (copied in by the builder as the ``caravela_env_worker`` package).

Messages, one JSON object per line, tagged by ``type``:
  worker -> pool  ``Hello``       once, after importing the env's entry point
  pool -> worker  ``ScoreRequest`` a batch of items
  worker -> pool  ``ScoreReply``   one ``ItemResult`` per item, in order

What an env's scorer may return is checked here too (``check_value``): a
finite number (not a bool), or ``{"score": number, "info": {...}}``. Anything
else becomes an error result naming the bad value, never a 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PROTOCOL_VERSION = 1
Api = Literal["score", "batch", "trl"]
ErrorKind = Literal["timeout", "crash", "bad_value", "exception", "protocol"]


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


@dataclass(frozen=True)
class Item:
    """One completion to score, with its prompt and the dataset fields (e.g. ``answer``)."""

    prompt: str
    completion: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemResult:
    """A score, or an error saying why there is none."""

    score: float | None
    error: str | None = None
    error_kind: ErrorKind | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hello:
    """Sent by a worker once its env is imported (or failed to import: ``error``)."""

    protocol: int
    pid: int
    python: str
    error: str | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Items for one worker; ``seq`` is echoed in the reply."""

    seq: int
    items: list[Item]


@dataclass(frozen=True)
class ScoreReply:
    """One result per requested item, in order."""

    seq: int
    results: list[ItemResult]


Message = Hello | ScoreRequest | ScoreReply


def encode(msg: Message) -> bytes:
    """One line of JSON; non-finite floats are refused rather than written as NaN."""
    body = json.dumps({"type": type(msg).__name__, **asdict(msg)}, allow_nan=False)
    return (body + "\n").encode()


def _expect(obj: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise ProtocolError(f"message lacks {key!r}: {str(obj)[:200]}")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool) and types is not bool:
        raise ProtocolError(f"{key!r} must be {types}, got {value!r:.200}")
    return value


def _result(obj: Any) -> ItemResult:
    if not isinstance(obj, dict):
        raise ProtocolError(f"a result must be an object, got {obj!r:.200}")
    score = obj.get("score")
    error = obj.get("error")
    if (score is None) == (error is None):
        raise ProtocolError(f"a result needs exactly one of score and error: {obj!r:.200}")
    if score is not None:
        check = check_value(score)
        if check.error is not None:
            raise ProtocolError(check.error)
    kind = obj.get("error_kind")
    info = obj.get("info") or {}
    if not isinstance(info, dict):
        raise ProtocolError(f"info must be an object, got {info!r:.200}")
    return ItemResult(score=score, error=error, error_kind=kind, info=info)


def decode(line: bytes | str) -> Message:
    """Parse and check one line; raises ``ProtocolError`` saying what is wrong."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"not JSON ({e}): {line!r:.200}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message must be a JSON object: {line!r:.200}")
    kind = obj.get("type")
    if kind == "Hello":
        return Hello(
            protocol=_expect(obj, "protocol", int),
            pid=_expect(obj, "pid", int),
            python=_expect(obj, "python", str),
            error=obj.get("error"),
        )
    if kind == "ScoreRequest":
        items = [
            Item(
                prompt=_expect(i, "prompt", str),
                completion=_expect(i, "completion", str),
                fields=_expect(i, "fields", dict),
            )
            for i in _expect(obj, "items", list)
        ]
        return ScoreRequest(seq=_expect(obj, "seq", int), items=items)
    if kind == "ScoreReply":
        results = [_result(r) for r in _expect(obj, "results", list)]
        return ScoreReply(seq=_expect(obj, "seq", int), results=results)
    raise ProtocolError(f"unknown message type {kind!r}")


def check_value(value: Any) -> ItemResult:
    """What an env's scorer returned, as a result: a finite number or ``{"score", "info"}``."""
    info: dict[str, Any] = {}
    if isinstance(value, dict):
        info = value.get("info") or {}
        if "score" not in value or not isinstance(info, dict):
            return ItemResult(
                None,
                f"bad return value {value!r:.200}: a dict result needs 'score' and an "
                "optional 'info' dict",
                "bad_value",
            )
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ItemResult(
            None, f"bad return value {value!r:.200}: a score must be a number", "bad_value"
        )
    if not math.isfinite(value):
        return ItemResult(None, f"bad return value {value!r}: a score must be finite", "bad_value")
    return ItemResult(float(value), info=info)


@dataclass(frozen=True)
class RewardResult:
    """What the orchestrator gets for one item: the result plus where it came from."""

    score: float | None
    """The reward; None exactly when ``error`` says why there is none."""
    error: str | None
    """Why there is no score (timeout, crash, exception text, bad return value)."""
    error_kind: ErrorKind | None
    """Error class, for counting per env."""
    info: dict[str, Any]
    """What the env chose to report besides the score (e.g. the extracted answer)."""
    env: str
    """Env name."""
    build_hash: str
    """Content hash of the env build that scored it."""
    worker: str
    """``<worker index>:<pid>`` of the worker process that produced the result."""
