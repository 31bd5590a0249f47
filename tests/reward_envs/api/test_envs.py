"""``/v1/envs``: registration from a path and inline, the admission canary, scoring, delete,
and the validation a client sees (422/404/409/413). Real server, real env workers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

InlineEnv = Callable[..., dict[str, Any]]
ARITH = Path(__file__).resolve().parents[3] / "reward_envs" / "builtin" / "arith"

ITEMS = [
    {"prompt": "Q: 2+2 A: ", "completion": "2+2=4. The answer is 4.", "fields": {"answer": "4"}},
    {"prompt": "Q: 2+3 A: ", "completion": "The answer is 6.", "fields": {"answer": "5"}},
    {"prompt": "Q: 1+1 A: ", "completion": "The answer is 2."},  # no answer: the scorer raises
]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_arith_from_path_admitted_in_its_venv_then_scores(api: LiveServer) -> None:
    rec = api.register({"path": str(ARITH)})
    assert (rec["name"], rec["isolation"], rec["source"]) == ("arith", "venv", "path")
    rec = api.wait("arith")
    assert rec["status"] == "ready", rec
    assert rec["build_hash"] and rec["mismatches"] == [] and rec["error"] is None
    assert [e["name"] for e in api.client.get("/v1/envs").json()["envs"]] == ["arith"]

    r = api.client.post("/v1/envs/arith/score", json={"items": ITEMS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["build_hash"] == rec["build_hash"]
    results = body["results"]
    assert [x["score"] for x in results] == [1.0, 0.0, None]
    assert results[2]["error_kind"] == "exception" and "answer" in results[2]["error"]
    assert all(":" in x["worker"] for x in results)


def test_failing_canary_rejects_with_the_mismatch(api: LiveServer, arith_copy: Path) -> None:
    manifest = arith_copy / "caravela-env.toml"
    text = manifest.read_text()
    manifest.write_text(text.replace("expected_score = 1.0", "expected_score = 0.5", 1))
    api.register({"path": str(arith_copy), "isolation": "process"})
    rec = api.wait("arith")
    assert rec["status"] == "rejected"
    assert rec["mismatches"] == [{"example": 0, "expected": 0.5, "got": 1.0, "error": None}]
    assert "1 of 3 examples" in rec["error"]
    r = api.client.post("/v1/envs/arith/score", json={"items": ITEMS[:1]})
    assert r.status_code == 409 and "rejected" in r.json()["detail"]


def test_canary_shows_scorer_errors_and_workers_that_cannot_start(
    api: LiveServer, inline_env: InlineEnv
) -> None:
    body = inline_env("raises")
    body["manifest"]["examples"].append({"prompt": "x", "completion": "boom", "expected_score": 1})
    api.register(body)
    rec = api.wait("raises")
    assert rec["status"] == "rejected"
    [m] = rec["mismatches"]
    assert m["example"] == 2 and m["got"] is None and "boom: x" in m["error"]

    broken = inline_env("broken")
    broken["files"]["scorer.py"] = "import not_a_module_anywhere\n"
    api.register(broken)
    rec = api.wait("broken")
    assert rec["status"] == "rejected" and "not_a_module_anywhere" in rec["error"]


def test_manifest_without_examples_is_rejected(api: LiveServer, inline_env: InlineEnv) -> None:
    api.register(inline_env("empty", examples=[]))
    rec = api.wait("empty")
    assert rec["status"] == "rejected" and "no [[examples]]" in rec["error"]


def test_failed_build_names_the_requirement(
    start_server: Callable[..., LiveServer], inline_env: InlineEnv, tmp_path: Path
) -> None:
    (tmp_path / "wheels").mkdir()
    api = start_server(wheelhouse=tmp_path / "wheels")  # an empty wheelhouse: fails fast
    body = inline_env("needs", isolation="venv", requirements=["surely-not-a-package==1"])
    api.register(body)
    rec = api.wait("needs")
    assert rec["status"] == "failed" and "surely-not-a-package" in rec["error"]


def test_inline_registration_scores_and_delete_cleans_up(
    api: LiveServer, inline_env: InlineEnv
) -> None:
    api.register(inline_env())
    rec = api.wait("lengths")
    assert rec["status"] == "ready", rec
    env_dir = Path(rec["path"])
    assert env_dir.parent == api.state_dir / "envs"
    assert (env_dir / "scorer.py").exists() and (env_dir / "caravela-env.toml").exists()

    items = [{"prompt": "p", "completion": "four"}, {"prompt": "p", "completion": "boom"}]
    r = api.client.post("/v1/envs/lengths/score", json={"items": items})
    results = r.json()["results"]
    assert results[0]["score"] == 4.0 and results[1]["error_kind"] == "exception"
    pids = {int(x["worker"].split(":")[1]) for x in results}
    assert all(_pid_alive(p) for p in pids)

    assert api.client.delete("/v1/envs/lengths").json() == {"name": "lengths", "deleted": True}
    assert not any(_pid_alive(p) for p in pids), "delete must stop the env's pool"
    assert not env_dir.exists()
    assert api.client.get("/v1/envs/lengths").status_code == 404
    assert api.client.get("/v1/envs").json() == {"envs": [], "count": 0}


def test_existing_name_is_409_unless_replace(api: LiveServer, inline_env: InlineEnv) -> None:
    first = api.register(inline_env())
    api.wait("lengths")
    r = api.client.post("/v1/envs", json=inline_env())
    assert r.status_code == 409 and "replace=true" in r.json()["detail"]
    second = api.register(inline_env(version="0.2.0"), replace="true")
    assert second["path"] != first["path"] and not Path(first["path"]).exists()
    rec = api.wait("lengths")
    assert (rec["status"], rec["version"]) == ("ready", "0.2.0")


@pytest.mark.parametrize("name", ["../x", "a;rm", "A", "x y", "a/b", "", "a" * 65])
def test_bad_env_names_are_422(api: LiveServer, name: str, inline_env: InlineEnv) -> None:
    r = api.client.post("/v1/envs", json=inline_env(name))
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "manifest"] and "env name" in error["msg"]


@pytest.mark.parametrize("name", ["a;rm", "A", "a%20b", "x" * 65, "-x"])
def test_bad_env_names_in_the_url_are_422(api: LiveServer, name: str) -> None:
    r = api.client.get(f"/v1/envs/{name}")
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["path", "name"]


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"../evil.py": "", "scorer.py": ""}, "files"),
        ({"/etc/evil.py": "", "scorer.py": ""}, "files"),
        ({"a/b/c.py": "", "scorer.py": ""}, "files"),
        ({"caravela-env.toml": "", "scorer.py": ""}, "caravela-env.toml"),
        ({"other.py": ""}, "scorer.py"),
        ({"scorer": "", "scorer/x.py": "", "scorer.py": ""}, "cannot write"),
    ],
)
def test_bad_inline_files_are_refused(
    api: LiveServer, files: dict[str, str], why: str, inline_env: InlineEnv
) -> None:
    body = inline_env()
    body["files"] = files
    r = api.client.post("/v1/envs", json=body)
    assert r.status_code == 422, r.text
    assert why in json.dumps(r.json()["detail"])
    envs = api.state_dir / "envs"
    assert not envs.exists() or not list(envs.iterdir()), "refused files must not stay behind"


@pytest.mark.parametrize(
    ("body", "field", "why"),
    [
        ({"path": "relative/dir"}, "path", "absolute"),
        ({"path": "/does/not/exist"}, "path", "not an existing directory"),
        ({"path": "/tmp"}, "path", "caravela-env.toml"),
        ({"path": "/x" * 300}, "path", ""),
        ({}, "body", "exactly one"),
        ({"path": str(ARITH), "files": {"a.py": ""}}, "body", "'files' goes with"),
        ({"path": str(ARITH), "isolation": "docker"}, "isolation", ""),
        ({"path": str(ARITH), "extra": 1}, "extra", ""),
    ],
)
def test_bad_registrations_are_422_naming_the_field(
    api: LiveServer, body: dict[str, object], field: str, why: str
) -> None:
    r = api.client.post("/v1/envs", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in e["loc"] for e in detail), detail
    assert why in json.dumps(detail)


def test_unsafe_manifests_are_refused(
    api: LiveServer, arith_copy: Path, inline_env: InlineEnv
) -> None:
    r = api.client.post("/v1/envs", json=inline_env(requirements=["--index-url=http://evil"]))
    assert r.status_code == 422 and "allow_index_urls" in r.text
    r = api.client.post("/v1/envs", json=inline_env(lock="../../etc/passwd"))
    assert r.status_code == 422 and "lock" in r.text
    toml = arith_copy / "caravela-env.toml"
    toml.write_text(toml.read_text().replace('name = "arith"', 'name = "Arith;rm"'))
    r = api.client.post("/v1/envs", json={"path": str(arith_copy)})
    assert r.status_code == 422 and "env name 'Arith;rm'" in r.json()["detail"]


def test_unknown_env_is_404(api: LiveServer) -> None:
    items = {"items": ITEMS[:1]}
    assert api.client.get("/v1/envs/nope").status_code == 404
    assert api.client.delete("/v1/envs/nope").status_code == 404
    assert api.client.get("/v1/envs/nope/health").status_code == 404
    r = api.client.post("/v1/envs/nope/score", json=items)
    assert r.status_code == 404 and r.json()["detail"] == "no env named 'nope'"


def test_score_body_limits(api: LiveServer, inline_env: InlineEnv) -> None:
    api.register(inline_env())
    api.wait("lengths")
    item = {"prompt": "p", "completion": "c"}
    r = api.client.post("/v1/envs/lengths/score", json={"items": [item] * 257})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]
    r = api.client.post("/v1/envs/lengths/score", json={"items": []})
    assert r.status_code == 422
    nan = '{"items": [{"prompt": "p", "completion": "c", "fields": {"x": NaN}}]}'
    r = api.client.post(
        "/v1/envs/lengths/score", content=nan, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text


def test_bodies_over_the_limit_are_413(api: LiveServer) -> None:
    big = {"items": [{"prompt": "x" * (5 << 20), "completion": ""}]}
    r = api.client.post("/v1/envs/lengths/score", json=big)
    assert r.status_code == 413 and "limit is 4194304 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer
        for _ in range(5):
            yield b"x" * (1 << 20)

    r = api.client.post("/v1/envs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert api.client.get("/health").status_code == 200  # the server is fine afterwards
