"""What Python's ``json`` reads but JSON has not (NaN, Infinity, 1e400, lone surrogates) gets a
422 naming the field on every env API route with a body, never a 500. Real server
(``common.http``'s guard and handlers, shared with the OpenAI-compatible server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

JSON = {"content-type": "application/json"}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
MARK = "@@"
"""Where a test body gets its hostile token: ``json.dumps`` the body, then put the raw text."""


def inline(**manifest: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "lengths",
        "version": "0.1.0",
        "entry_point": "scorer:score",
        "isolation": "process",
        "examples": [{"prompt": "p", "completion": "abc", "expected_score": 3.0}],
        **manifest,
    }
    return {"manifest": body, "files": {"scorer.py": "def score(p, c, **f):\n    return 1.0\n"}}


def raw(body: Any, token: str) -> str:
    """``body`` as JSON text with the string ``"@@"`` replaced by ``token`` written as is."""
    return json.dumps(body).replace(f'"{MARK}"', token)


NUMBER_FIELDS: list[tuple[str, Any, list[Any]]] = [
    (
        "/v1/envs",
        {"path": "/envs/x", "mixture": {"dataset": "/d.jsonl", "weight": MARK}},
        ["body", "mixture", "weight"],
    ),
    ("/v1/envs", inline(timeout_s=MARK), ["body", "manifest", "timeout_s"]),
    (
        "/v1/envs",
        inline(examples=[{"prompt": "p", "completion": "c", "expected_score": MARK}]),
        ["body", "manifest", "examples", 0, "expected_score"],
    ),
    (
        "/v1/envs/arith/score",
        {"items": [{"prompt": "p", "completion": "c", "fields": {"answer": MARK}}]},
        ["body", "items", 0, "fields", "answer"],
    ),
]


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_numbers_get_422_naming_the_field(api: LiveServer, number: str) -> None:
    for route, body, loc in NUMBER_FIELDS:
        r = api.client.post(route, content=raw(body, number), headers=JSON)
        assert r.status_code == 422, (route, r.text)
        (err,) = r.json()["detail"]
        assert err["loc"] == loc and err["input"] == number, (route, err)
        assert "send a finite number" in err["msg"]
        assert "error" not in r.json()  # the env API keeps FastAPI's shape only


SURROGATE_FIELDS: list[tuple[str, Any, list[Any]]] = [
    ("/v1/envs", {"path": MARK}, ["body", "path"]),
    ("/v1/envs", inline(name=MARK), ["body", "manifest", "name"]),
    (
        "/v1/envs",
        {**inline(), "files": {"scorer.py": MARK}},
        ["body", "files", "scorer.py"],
    ),
    (
        "/v1/envs/arith/score",
        {"items": [{"prompt": MARK, "completion": "c"}]},
        ["body", "items", 0, "prompt"],
    ),
    (
        "/v1/envs/arith/score",
        {"items": [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": MARK}]},
        ["body", "items", 1, "completion"],
    ),
]


@pytest.mark.parametrize("surrogate", ['"\\ud800"', '"ok \\udfff"', '"\\ude00\\ud83d"'])
def test_lone_surrogates_get_422_naming_the_field(api: LiveServer, surrogate: str) -> None:
    for route, body, loc in SURROGATE_FIELDS:
        r = api.client.post(route, content=raw(body, surrogate), headers=JSON)
        assert r.status_code == 422, (route, r.text)
        (err,) = r.json()["detail"]
        assert err["loc"] == loc and "lone surrogate" in err["msg"], (route, err)


def test_a_lone_surrogate_in_a_key_gets_422(api: LiveServer) -> None:
    body = '{"items": [{"prompt": "p", "completion": "c", "fields": {"\\ud800": 1}}]}'
    r = api.client.post("/v1/envs/arith/score", content=body, headers=JSON)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "items", 0, "fields", "\\ud800"]


def test_bodies_python_cannot_read_get_422_not_500(api: LiveServer) -> None:
    for body, expect in [
        (b'{"path": "\xff"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        (
            b'{"items": [{"prompt": "p", "completion": "c", "fields": {"n": '
            + b"9" * 5000
            + b"}}]}",
            "5000 digits is too large",
        ),
    ]:
        r = api.client.post("/v1/envs/arith/score", content=body, headers=JSON)
        assert r.status_code == 422 and expect in r.text, r.text
    r = api.client.post("/v1/envs", content=b"\xff\xfe", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "\\xff\\xfe"


def test_valid_bodies_still_pass(
    api: LiveServer, inline_env: Callable[..., dict[str, Any]]
) -> None:
    """The guard replays the body it read: a normal registration with non-ASCII text and a
    surrogate pair (an astral character) goes through."""
    body = inline_env()
    body["files"]["notes.txt"] = "caf\u00e9 \U0001f600"
    api.register(body)
    assert api.wait("lengths")["status"] == "ready"
