"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1, queried by the openai client."""

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from common.paths import TINY_MODEL
from inference_server.openai_api import create_app
from inference_server.serve import build_engine
from orchestrator.cli import main


@pytest.fixture(scope="module")
def server():
    engine, tok = build_engine(TINY_MODEL, "transformers", "float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, tok, "tiny"), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_openai_client_completions(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    r = client.completions.create(
        model="tiny", prompt="Q: 50+98-54 A: ", max_tokens=40, temperature=0.0
    )
    assert r.choices[0].text.startswith("50+98=148")
    assert "The answer is" in r.choices[0].text
    assert r.usage.completion_tokens > 0
    many = client.completions.create(
        model="tiny", prompt=["Q: 1+2+3 A: ", "Q: 9-4+1 A: "], n=3, max_tokens=40, seed=0
    )
    assert len(many.choices) == 6 and [c.index for c in many.choices] == list(range(6))


def test_openai_client_chat_and_models(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Q: 3-50+2 A: "}],
        max_tokens=40,
        temperature=0.0,
    )
    assert r.choices[0].message.role == "assistant"
    assert "The answer is" in r.choices[0].message.content


def test_health_and_prometheus_metrics(server):
    h = httpx.get(f"{server}/health").json()
    assert h == {"status": "ok", "model": "tiny", "policy_version": 0}
    text = httpx.get(f"{server}/metrics").text
    assert "caravela_inference_requests_total" in text
    assert "caravela_inference_policy_version 0.0" in text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "Q", "temperature": -1}, "temperature"),
        ({"prompt": "Q", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Q", "n": 1000}, "n"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_requests_get_422_naming_the_field(server, body, field):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == 422
    assert field in {str(x) for e in r.json()["detail"] for x in e["loc"]}


def test_unknown_model_is_404(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Q", "model": "gpt-9"})
    assert r.status_code == 404 and "use 'tiny'" in r.json()["detail"]


def test_serve_refuses_a_missing_model_dir(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--backend", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "is not a model: give an HF model directory" in err and "a run directory" in err


def test_caravela_inference_entry_point_serves_the_model(tmp_path):
    """``caravela-inference`` is ``caravela serve`` under the component's name: the installed
    console script starts the same server."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "caravela-inference"
    bad = subprocess.run([script, str(tmp_path), "--backend", "transformers"], capture_output=True)
    assert bad.returncode == 2 and b"is not a HF model directory" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [script, str(TINY_MODEL), "--backend", "transformers", "--name", "tiny"]
    proc = subprocess.Popen([*args, "--port", str(port)], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                assert time.time() < deadline, "caravela-inference did not come up in 120 s"
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(10)
