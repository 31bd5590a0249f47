"""``registry.json`` across restarts: ready envs stay ready (found again in the store),
builds cut short are redone, vanished builds are ``failed`` with the reason."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from reward_envs.api.metrics import ApiMetrics
from reward_envs.api.registry import Registry
from reward_envs.api.settings import ApiSettings

if TYPE_CHECKING:
    from conftest import LiveServer

ITEM = {"prompt": "Q", "completion": "The answer is 7.", "fields": {"answer": "7"}}


def _registry(state: Path) -> dict[str, Any]:
    data = json.loads((state / "registry.json").read_text())
    return {e["name"]: e for e in data["envs"]}


def test_restart_keeps_envs_ready(
    start_server: Callable[..., LiveServer],
    tmp_path: Path,
    arith: Path,
    arith_copy: Path,
    inline_env: Callable[..., dict[str, Any]],
) -> None:
    state = tmp_path / "state"
    first = start_server(state)
    first.register({"path": str(arith)})  # venv
    first.register(inline_env())  # process, files in the state dir
    toml = arith_copy / "caravela-env.toml"
    toml.write_text(
        toml.read_text().replace('name = "arith"', 'name = "bad"').replace("0.0", "1.0")
    )
    first.register({"path": str(arith_copy)})
    before = {n: first.wait(n) for n in ("arith", "lengths", "bad")}
    assert [r["status"] for r in before.values()] == ["ready", "ready", "rejected"]
    first.stop()

    saved = _registry(state)  # valid JSON, every env in it
    assert {n: e["status"] for n, e in saved.items()} == {
        "arith": "ready",
        "lengths": "ready",
        "bad": "rejected",
    }
    assert not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]

    second = start_server(state)
    after = {e["name"]: e for e in second.client.get("/v1/envs").json()["envs"]}
    assert after == before
    r = second.client.post("/v1/envs/arith/score", json={"items": [ITEM]})
    assert r.status_code == 200 and r.json()["results"][0]["score"] == 1.0
    r = second.client.post("/v1/envs/lengths/score", json={"items": [ITEM]})
    assert r.json()["results"][0]["score"] == len(ITEM["completion"])


def test_builds_cut_short_are_redone_and_vanished_builds_fail(
    start_server: Callable[..., LiveServer],
    tmp_path: Path,
    arith: Path,
    inline_env: Callable[..., dict[str, Any]],
) -> None:
    state, store = tmp_path / "state", tmp_path / "own-store"
    first = start_server(state, store=store)
    first.register({"path": str(arith)})
    first.register(inline_env())
    arith_hash = first.wait("arith")["build_hash"]
    first.wait("lengths")
    first.stop()

    # as if the server died mid-build: the record says building
    data = json.loads((state / "registry.json").read_text())
    for e in data["envs"]:
        if e["name"] == "lengths":
            e["status"], e["build_hash"] = "building", None
    (state / "registry.json").write_text(json.dumps(data))
    shutil.rmtree(store / f"arith-{arith_hash}")  # and its venv build was deleted

    second = start_server(state, store=store)
    arith_rec = second.client.get("/v1/envs/arith").json()
    assert arith_rec["status"] == "failed" and "is gone" in arith_rec["error"]
    r = second.client.post("/v1/envs/arith/score", json={"items": [ITEM]})
    assert r.status_code == 409
    assert second.wait("lengths")["status"] == "ready"
    assert _registry(state)["lengths"]["status"] == "ready"


def test_one_server_per_state_dir(tmp_path: Path) -> None:
    settings = ApiSettings(state_dir=tmp_path / "state", store=tmp_path / "store")
    first = Registry(settings, ApiMetrics())
    first.start()
    try:
        with pytest.raises(RuntimeError, match="another env API server"):
            Registry(settings, ApiMetrics()).start()
    finally:
        first.close()
    again = Registry(settings, ApiMetrics())
    again.start()
    again.close()


def test_corrupt_registry_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_text('{"envs": [{"name": 1}]')
    registry = Registry(ApiSettings(state_dir=state), ApiMetrics())
    with pytest.raises(ValueError, match="registry.json is not a valid env registry"):
        registry.start()
    registry.close()
