"""Fixtures: real env API servers (uvicorn on 127.0.0.1, a free port, in a thread) and
httpx clients carrying their token. The env build store is shared by the session, so the
arith venv is built once. Test modules get helpers as fixtures (``--import-mode=importlib``
keeps this file out of their imports) and import ``LiveServer`` only for type hints."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from reward_envs.api.main import create_app
from reward_envs.api.settings import ApiSettings

ARITH = Path(__file__).resolve().parents[3] / "reward_envs" / "builtin" / "arith"

SCORER = """
import time


def score(prompt, completion, **fields):
    if completion == "slow":
        time.sleep(60)
    if completion == "boom":
        raise RuntimeError("boom: " + prompt)
    return float(len(completion))
"""


def inline_env(name: str = "lengths", **manifest: Any) -> dict[str, Any]:
    """Body of an inline registration: scores len(completion), raises on "boom"."""
    body = {
        "name": name,
        "version": "0.1.0",
        "entry_point": "scorer:score",
        "isolation": "process",
        "timeout_s": 2,
        "examples": [
            {"prompt": "p", "completion": "abc", "expected_score": 3.0},
            {"prompt": "p", "completion": "", "expected_score": 0.0, "fields": {"k": [1, "x"]}},
        ],
        **manifest,
    }
    return {"manifest": body, "files": {"scorer.py": SCORER}}


class LiveServer:
    """One API server over ``state_dir``; ``client`` sends its token."""

    def __init__(self, state_dir: Path, store: Path, **settings: Any) -> None:
        self.state_dir = state_dir
        self.app = create_app(ApiSettings(state_dir=state_dir, store=store, **settings))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.token = (state_dir / "api-token").read_text().strip()
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.client = httpx.Client(base_url=self.url, headers=self.auth, timeout=60)

    def register(self, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        r = self.client.post("/v1/envs", json=body, params=params)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "building"
        return r.json()

    def wait(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The env's record once it left ``building``."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.client.get(f"/v1/envs/{name}").json()
            if rec["status"] != "building":
                return rec
            assert time.monotonic() < deadline, f"{name} still building after {timeout} s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env-store")


@pytest.fixture
def start_server(tmp_path: Path, store: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts servers (default state dir: this test's tmp dir); stops them afterwards."""
    started: list[LiveServer] = []

    def start(state_dir: Path | None = None, **settings: Any) -> LiveServer:
        settings.setdefault("store", store)
        server = LiveServer(state_dir or tmp_path / "state", **settings)
        started.append(server)
        return server

    yield start
    for s in started:
        if s.thread.is_alive():
            s.stop()


@pytest.fixture
def api(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@pytest.fixture
def arith() -> Path:
    """The built-in arith env's directory."""
    return ARITH


@pytest.fixture(name="inline_env")
def inline_env_fixture() -> Callable[..., dict[str, Any]]:
    """``inline_env(name, **manifest)``: an inline registration body."""
    return inline_env


@pytest.fixture
def arith_copy(tmp_path: Path) -> Path:
    """A copy of the built-in arith env to edit."""
    return Path(shutil.copytree(ARITH, tmp_path / "arith"))
