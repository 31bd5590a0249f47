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


# -- hostile bodies: never a 500 ----------------------------------------------------------------
ROUTES = {
    "/v1/completions": '{"prompt": "Q: 1+2 A: ", %s}',
    "/v1/chat/completions": '{"messages": [{"role": "user", "content": "Q: 1+2 A: "}], %s}',
}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "n", "seed"])
@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_numbers_get_422_naming_the_field(server, route, field, number):
    """Python's json reads NaN/Infinity literals and overflows 1e400 to inf; each is refused
    before it reaches pydantic or the engine, with the field and the number as sent."""
    body = ROUTES[route] % f'"max_tokens": 4, "{field}": {number}'
    r = httpx.post(f"{server}{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", field] and err["input"] == number
    assert "send a finite number" in err["msg"]
    # OpenAI's error object, the part OpenAI's clients show
    assert r.json()["error"]["param"] == field
    assert r.json()["error"]["message"].startswith(f"{field}: {number} ")


@pytest.mark.parametrize(
    ("route", "body", "loc"),
    [
        ("/v1/completions", '{"prompt": "Q \\ud800"}', ["body", "prompt"]),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', ["body", "prompt", 1]),
        ("/v1/completions", '{"prompt": "Q", "stop": "\\ud800"}', ["body", "stop"]),
        ("/v1/completions", '{"prompt": "Q", "stop": ["x", "\\udc00"]}', ["body", "stop", 1]),
        ("/v1/completions", '{"prompt": "Q", "model": "\\ud800"}', ["body", "model"]),
        ("/v1/completions", '{"prompt": "Q", "\\ud800": 1}', ["body", "\\ud800"]),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
            ["body", "messages", 0, "content"],
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Q"}], "stop": ["\\ude00"]}',
            ["body", "stop", 0],
        ),
    ],
)
def test_lone_surrogates_get_422_naming_the_field(server, route, body, loc):
    """``"\\ud800"`` is valid JSON but no valid Unicode: tokenizers and UTF-8 writers refuse it."""
    r = httpx.post(f"{server}{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == loc and "lone surrogate" in err["msg"]


def test_a_surrogate_pair_is_a_character_not_an_error(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Q \U0001f600 A: ", "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b'{"prompt": "\xff"}', "not valid UTF-8"),
        (b'{"prompt": "\xed\xa0\x80"}', "lone surrogate"),  # a surrogate encoded as UTF-8
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        (b'{"prompt": "Q", "max_tokens": ' + b"9" * 5000 + b"}", "5000 digits is too large"),
    ],
)
def test_bodies_python_cannot_read_get_422(server, body, expect):
    r = httpx.post(
        f"{server}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and expect in r.text, r.text


def test_a_non_json_body_that_is_not_utf8_gets_422(server):
    """FastAPI echoes a non-JSON body as the error's input; bytes that are not UTF-8 are
    written escaped (FastAPI's own encoder raised: a 500)."""
    r = httpx.post(
        f"{server}/v1/completions", content=b"\xff\xfe", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "\\xff\\xfe"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": "Q", "stop": [""]}, "stop"), ({"prompt": "Q", "seed": 2**64}, "seed")],
)
def test_empty_stop_string_and_huge_seed_get_422(server, body, field):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == 422
    assert field in {str(x) for e in r.json()["detail"] for x in e["loc"]}


# -- the model's context (tiny model: max_position_embeddings = 128) -----------------------------
def prompt_tokens(text: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    return 1 + len(tok(text, add_special_tokens=False)["input_ids"])  # BOS + text


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_max_tokens_beyond_the_context_is_400_with_the_numbers(server, route):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    text = "Q: 50+98-54 A: "
    n = prompt_tokens(text)
    with pytest.raises(openai.BadRequestError) as e:
        if route == "completions":
            client.completions.create(model="tiny", prompt=text, max_tokens=5000)
        else:
            messages = [{"role": "user", "content": text}]
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=5000)
    assert e.value.status_code == 400
    assert (
        f"prompt has {n} tokens and max_tokens is 5000: {n + 5000} tokens exceed the context "
        f"of 128 the model has; lower max_tokens to {128 - n} or less"
    ) in str(e.value)
    # the largest max_tokens that fits is served
    r = client.completions.create(model="tiny", prompt=text, max_tokens=128 - n, temperature=0)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens <= 128 - n


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_prompt_beyond_the_context_is_400_saying_to_shorten_it(server, route):
    text = "1+" * 200
    n = prompt_tokens(text)
    assert n > 128
    if route == "completions":
        r = httpx.post(f"{server}/v1/completions", json={"prompt": text, "max_tokens": 5})
    else:
        messages = [{"role": "user", "content": text}]
        r = httpx.post(
            f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 5}
        )
    assert r.status_code == 400
    assert f"prompt has {n} tokens" in r.json()["detail"]
    assert "shorten the prompt to 123 tokens or less" in r.json()["detail"]


def test_one_prompt_too_long_refuses_the_whole_batch(server):
    r = httpx.post(
        f"{server}/v1/completions", json={"prompt": ["Q: 1+2 A: ", "1+" * 200], "max_tokens": 5}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("request 1: prompt has")
