"""``/health``, ``/v1/envs/{name}/health`` and ``/metrics`` after real score calls."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import LiveServer


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (labels in the order given)."""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(inner)}\}} (\S+)$", text, re.M)
    assert m, f"no {name}{{{inner}}} in /metrics"
    return float(m.group(1))


def test_server_health_needs_no_token(api: LiveServer) -> None:
    r = api.client.get("/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_env_health_shows_the_warm_pool_counters(
    api: LiveServer, inline_env: Callable[..., dict[str, Any]]
) -> None:
    api.register(inline_env())
    api.wait("lengths")
    health = api.client.get("/v1/envs/lengths/health").json()
    assert health == {
        "name": "lengths",
        "status": "ready",
        "pool": {"started": False, "workers": 2, "counters": {}},
    }
    items = [{"prompt": "p", "completion": c} for c in ["ab", "abc", "boom"]]
    api.client.post("/v1/envs/lengths/score", json={"items": items})
    pool = api.client.get("/v1/envs/lengths/health").json()["pool"]
    assert pool["started"] is True
    assert pool["counters"] == {"items": 3, "scored": 2, "errors": 1, "errors/exception": 1}


def test_metrics_count_requests_errors_timeouts_and_latency(
    api: LiveServer, arith: Path, inline_env: Callable[..., dict[str, Any]]
) -> None:
    api.register({"path": str(arith), "isolation": "process"})
    api.register(inline_env(timeout_s=0.5))
    assert api.wait("arith")["status"] == "ready"
    assert api.wait("lengths")["status"] == "ready"
    ok = {"prompt": "Q", "completion": "The answer is 4.", "fields": {"answer": "4"}}
    no_answer = {"prompt": "Q", "completion": "The answer is 4."}  # the scorer raises
    for _ in range(2):
        api.client.post("/v1/envs/arith/score", json={"items": [ok, ok, no_answer]})
    slow = [{"prompt": "p", "completion": c} for c in ["slow", "boom", "fine"]]
    results = api.client.post("/v1/envs/lengths/score", json={"items": slow}).json()["results"]
    assert [r["error_kind"] for r in results] == ["timeout", "exception", None]
    api.client.post("/v1/envs/nope/score", json={"items": [ok]})  # unknown: no label made

    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _sample(text, "caravela_env_score_requests_total", env="arith") == 2
    assert _sample(text, "caravela_env_items_total", env="arith") == 6
    assert _sample(text, "caravela_env_errors_total", env="arith", kind="exception") == 2
    assert 'caravela_env_timeouts_total{env="arith"}' not in text
    assert _sample(text, "caravela_env_errors_total", env="lengths", kind="timeout") == 1
    assert _sample(text, "caravela_env_errors_total", env="lengths", kind="exception") == 1
    assert _sample(text, "caravela_env_timeouts_total", env="lengths") == 1
    assert _sample(text, "caravela_env_score_seconds_count", env="arith") == 2
    assert _sample(text, "caravela_env_score_seconds_sum", env="lengths") >= 0.5
    assert 'env="nope"' not in text
