"""Property-based tests from the app's own OpenAPI schema (schemathesis): whatever a client
sends, authenticated, the server answers without a 5xx. Each operation runs against a real
server with the arith env registered, so generated calls also reach a ready env.

The schema is taken from an app built at import (``create_app`` touches no file) rather than
through ``schemathesis.pytest.from_fixture``, which schemathesis 4.32 cannot run on pytest 9
(it sets ``Function._nodeid``, gone from pytest 9).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from reward_envs.api.main import create_app
from reward_envs.api.settings import ApiSettings

if TYPE_CHECKING:
    from conftest import LiveServer

schema = schemathesis.openapi.from_dict(
    create_app(ApiSettings(state_dir=Path("/nonexistent/schema-only"))).openapi()
)


@pytest.fixture
def arith_api(api: LiveServer, arith: Path) -> LiveServer:
    api.register({"path": str(arith), "isolation": "process"})
    assert api.wait("arith")["status"] == "ready"
    return api


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, arith_api: LiveServer) -> None:
    case.call_and_validate(
        base_url=arith_api.url, headers=arith_api.auth, checks=[not_a_server_error], timeout=30
    )
