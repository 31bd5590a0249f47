"""JSON rendering that cannot fail: every body is ASCII-escaped JSON without NaN.

Starlette's ``JSONResponse`` writes UTF-8 and refuses NaN, so a request echoing a lone
surrogate or a ``NaN`` literal (both parse as JSON in Python) into a 422 would turn into a
500. These handlers keep FastAPI's shapes (``{"detail": ...}``) and make them safe.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class SafeJSONResponse(JSONResponse):
    """ASCII JSON; non-finite floats written as strings."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":")).encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


async def validation_error(request: Request, exc: Exception) -> SafeJSONResponse:
    """422 listing each invalid field (``loc``) and why, as FastAPI does."""
    assert isinstance(exc, RequestValidationError)
    return SafeJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


async def http_error(request: Request, exc: Exception) -> SafeJSONResponse:
    """An ``HTTPException``'s status, detail and headers."""
    assert isinstance(exc, StarletteHTTPException)
    return SafeJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
