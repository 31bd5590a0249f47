"""``common.http`` without a server: what the response class writes and what the body check
finds (the servers' own tests send these over HTTP)."""

import json
import math

from common.http import SafeJSONResponse, body_problems, error_body, parse_body


def test_response_never_writes_nan_or_infinity_literals() -> None:
    body = SafeJSONResponse({"info": {"a": math.nan, "b": [math.inf, -math.inf, 1.5]}}).body
    assert json.loads(body, parse_constant=lambda c: 1 / 0) == {
        "info": {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5]}
    }


def test_response_is_ascii_with_surrogates_escaped() -> None:
    body = SafeJSONResponse({"t": "caf\u00e9 \ud800"}).body
    assert body.isascii() and json.loads(body) == {"t": "caf\u00e9 \ud800"}


def test_body_problems_name_every_field_in_order() -> None:
    text = '{"a": NaN, "b": [1, 2.5, 1e400], "c": {"\\ud800": 1, "d": "x\\udfffy"}, "e": "ok"}'
    problems = body_problems(parse_body(text.encode()))
    assert [p["loc"] for p in problems] == [
        ["body", "a"],
        ["body", "b", 2],
        ["body", "c", "\\ud800"],
        ["body", "c", "d"],
    ]
    assert [p["input"] for p in problems] == ["NaN", "1e400", "\\ud800", "x\\udfffy"]
    assert "index 1" in problems[3]["msg"]


def test_valid_json_has_no_problems() -> None:
    text = '{"a": 1e308, "b": -0.0, "c": "\\ud83d\\ude00", "d": [null, true, 12345678901234567890]}'
    assert body_problems(parse_body(text.encode())) == []


def test_openai_error_object_names_the_first_field() -> None:
    detail = [
        {"loc": ["body", "temperature"], "msg": "NaN is not a JSON number"},
        {"loc": ["body", "stop", 0], "msg": "string holds a lone surrogate"},
    ]
    err = error_body(422, detail, openai=True)["error"]
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    assert err["message"] == (
        "temperature: NaN is not a JSON number; stop.0: string holds a lone surrogate"
    )
    assert error_body(400, "too long", openai=True)["error"]["message"] == "too long"
    assert "error" not in error_body(400, "too long")
