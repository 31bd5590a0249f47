"""Safe JSON in and out of Caravela's HTTP servers (the env API and the OpenAI-compatible server).

Python's ``json`` reads more than JSON: ``NaN``, ``Infinity`` and ``-Infinity`` literals, numbers
like ``1e400`` that overflow to ``inf``, and ``"\\ud800"`` escapes that decode to lone
surrogates no UTF-8 encoder accepts. Left to FastAPI, such a body reaches pydantic (which
passes NaN through or echoes it in a 422 that Starlette's ``JSONResponse`` cannot write) or
the handler (a tokenizer refusing the string): a 500. Here:

- ``JSONBodyGuard`` (ASGI middleware) reads a JSON request body once, and answers 422 in
  FastAPI's shape (``{"detail": [{"loc": ["body", field, ...], "msg": ...}]}``) naming every
  field that holds a non-finite number, an integer beyond Python's 4300 digits, or a string
  that is not valid Unicode, before any route sees it. Bodies it cannot parse at all are left
  to FastAPI (422 ``json_invalid``).
- ``SafeJSONResponse`` writes ASCII JSON that never holds a NaN or Infinity literal: a
  non-finite number a route returns in a free-form field (an env's ``info``) is written as the
  string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.
- ``install`` adds the guard and the exception handlers (validation errors, ``HTTPException``)
  to an app. Error bodies keep FastAPI's ``{"detail": ...}``; the OpenAI-compatible server
  adds OpenAI's ``{"error": {"message": ...}}`` beside it, which OpenAI's clients show.
"""

from __future__ import annotations

import email.message
import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_REPORTED = 20
"""At most this many bad fields are listed in one 422."""


class SafeJSONResponse(JSONResponse):
    """ASCII JSON (lone surrogates escaped); non-finite floats written as strings."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except ValueError:  # a NaN or Infinity somewhere: the slow path
            text = json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":"))
        return text.encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# -- request bodies -------------------------------------------------------------------------
class _Bad:
    """A JSON number Python parsed but no field can take; ``text`` is how the body wrote it."""

    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why


def _constant(name: str) -> _Bad:  # NaN, Infinity, -Infinity
    return _Bad(name, f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float | _Bad:
    value = float(text)
    if math.isfinite(value):
        return value
    return _Bad(text, f"{text} is beyond the range of a 64-bit float; send a finite number")


def _int(text: str) -> int | _Bad:
    try:
        return int(text)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return _Bad(f"{text[:20]}...", f"an integer of {len(text)} digits is too large")


def _not_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(s: str) -> str:
    """``s`` with lone surrogates written as ``\\udxxx`` escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def body_problems(value: Any) -> list[dict[str, Any]]:
    """FastAPI-style error entries (``loc`` from ``"body"``) for every non-finite or
    oversized number and every string or key that UTF-8 cannot encode in ``value``, a body
    parsed by ``parse_body``; empty when there is none."""
    problems: list[dict[str, Any]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ("body",))]
    while stack and len(problems) < MAX_REPORTED:
        obj, loc = stack.pop()
        if isinstance(obj, _Bad):
            problems.append(
                {"type": "finite_number", "loc": list(loc), "msg": obj.why, "input": obj.text}
            )
        elif isinstance(obj, str):
            if _not_unicode(obj):
                problems.append(_unicode_problem(list(loc), obj))
        elif isinstance(obj, dict):
            for k, v in reversed(obj.items()):
                if _not_unicode(k):
                    problems.append(_unicode_problem([*loc, _printable(k)], k, key=True))
                else:
                    stack.append((v, (*loc, k)))
        elif isinstance(obj, list):
            stack.extend(((v, (*loc, i)) for i, v in reversed(list(enumerate(obj)))))
    return problems


def _unicode_problem(loc: list[Any], s: str, key: bool = False) -> dict[str, Any]:
    at = next(i for i, c in enumerate(s) if 0xD800 <= ord(c) <= 0xDFFF)
    what = "key" if key else "string"
    return {
        "type": "string_unicode",
        "loc": loc,
        "msg": f"{what} holds a lone surrogate (\\u{ord(s[at]):04x} at index {at}), which is "
        "not valid Unicode; send the character as a UTF-8 or a surrogate-pair escape",
        "input": _printable(s[:200]),
    }


def parse_body(body: bytes) -> Any:
    """``body`` parsed as Python's ``json`` would, except that what ``body_problems`` reports
    is kept as a marker; raises ``ValueError`` (``json.JSONDecodeError``,
    ``UnicodeDecodeError``) or ``RecursionError`` where ``json.loads`` would."""
    return json.loads(body, parse_constant=_constant, parse_float=_float, parse_int=_int)


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse this request's body as JSON (its own test: no content
    type, or ``application/json`` / ``application/*+json``)."""
    raw = dict(scope["headers"]).get(b"content-type")
    if raw is None:
        return True
    message = email.message.Message()
    message["content-type"] = raw.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class JSONBodyGuard:
    """Pure ASGI middleware: 422 for a JSON body holding what ``body_problems`` finds (or
    that is not UTF-8, or nests past the parser's depth); any other body goes on unchanged.
    Put a body-size limit outside it: it reads the whole body into memory."""

    def __init__(self, app: ASGIApp, openai_errors: bool = False) -> None:
        self.app = app
        self.openai_errors = openai_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone: let the app see it
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problems: list[dict[str, Any]] = []
        if body.strip():
            try:
                problems = body_problems(parse_body(body))
            except UnicodeDecodeError as e:
                problems = [_problem("string_unicode", f"the body is not valid UTF-8 ({e})")]
            except RecursionError:
                problems = [_problem("json_invalid", "the body nests too deeply to parse")]
            except ValueError:  # not JSON at all: FastAPI answers json_invalid itself
                pass
        if problems:
            reply = error_body(422, problems, self.openai_errors)
            await SafeJSONResponse(reply, status_code=422)(scope, receive, send)
            return
        end: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([], end, receive), send)


def _problem(kind: str, msg: str) -> dict[str, Any]:
    return {"type": kind, "loc": ["body"], "msg": msg, "input": None}


def _replay(sent: list[bool], first: Message, receive: Receive) -> Receive:
    async def replay() -> Message:
        if sent:
            return await receive()
        sent.append(True)
        return first

    return replay


# -- error bodies and exception handlers ----------------------------------------------------
def error_body(status: int, detail: Any, openai: bool = False) -> dict[str, Any]:
    """FastAPI's ``{"detail": detail}``; with ``openai``, also OpenAI's ``"error"`` object
    (``message``, ``type``, ``param``, ``code``), the part OpenAI's clients put in the text of
    the exceptions they raise."""
    body: dict[str, Any] = {"detail": detail}
    if openai:
        param = None
        if isinstance(detail, list) and detail and all(_located(e) for e in detail):
            fields = [".".join(str(x) for x in e["loc"] if x != "body") for e in detail]
            why = [f"{f or 'body'}: {e['msg']}" for f, e in zip(fields, detail, strict=True)]
            message = "; ".join(why)  # validation errors: "field.sub: why; ..."
            param = fields[0] or None
        else:
            message = str(detail)
        kind = "invalid_request_error" if status < 500 else "server_error"
        body["error"] = {"message": message, "type": kind, "param": param, "code": None}
    return body


def _located(error: Any) -> bool:
    return isinstance(error, dict) and isinstance(error.get("loc"), list | tuple) and "msg" in error


def _bytes_text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def install(app: FastAPI, openai_errors: bool = False) -> None:
    """Add the body guard and the error handlers to ``app`` (built with
    ``default_response_class=SafeJSONResponse``); ``openai_errors``: error bodies also carry
    OpenAI's ``error`` object. Middleware added after this call wraps the guard (add a
    body-size limit after it)."""

    async def validation_error(request: Request, exc: Exception) -> SafeJSONResponse:
        """422 listing each invalid field (``loc``) and why, as FastAPI does; an echoed
        input that is not UTF-8 (a non-JSON body) is written with ``\\xNN`` escapes."""
        assert isinstance(exc, RequestValidationError)
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: _bytes_text})
        return SafeJSONResponse(error_body(422, errors, openai_errors), status_code=422)

    async def http_error(request: Request, exc: Exception) -> SafeJSONResponse:
        """An ``HTTPException``'s status, detail and headers."""
        assert isinstance(exc, StarletteHTTPException)
        body = error_body(exc.status_code, exc.detail, openai_errors)
        return SafeJSONResponse(body, exc.status_code, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(JSONBodyGuard, openai_errors=openai_errors)
