"""Prompt formats (``inference_server.tokens``): plain and the tokenizer's chat template.

The chat template is set on the shipped tiny model's tokenizer here (no hub); its
vocabulary is a few arithmetic tokens, so the template writes only text it knows.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.paths import TINY_MODEL
from inference_server.tokens import (
    check_prompt_format,
    encode_conversations,
    encode_prompts,
    format_key,
)

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} = {% else %}Q: {{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} A: {% endif %}"
)
"""System text, then ``Q: <user> A: `` (the tiny model's own prompt shape), after BOS."""


def chat_model(dst: Path) -> Path:
    """A copy of the tiny model whose tokenizer_config.json carries ``TEMPLATE``."""
    shutil.copytree(TINY_MODEL, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TEMPLATE}, indent=2))
    return dst


@pytest.fixture(scope="module")
def plain_tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(chat_model(tmp_path_factory.mktemp("m") / "chat"))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_format_applies_the_template_with_and_without_system(chat_tok):
    tok = chat_tok
    bos = tok.bos_token_id
    got = encode_prompts(tok, ["50+98-54", "3-5"], "chat")
    assert got == [[bos, *ids(tok, "Q: 50+98-54 A: ")], [bos, *ids(tok, "Q: 3-5 A: ")]]
    with_system = encode_prompts(tok, ["50+98-54"], "chat", system="1+1")
    assert with_system == [[bos, *ids(tok, "1+1 = Q: 50+98-54 A: ")]]
    # one BOS, from the template: nothing is prepended by hand in chat format
    assert [x.count(bos) for x in [*got, *with_system]] == [1, 1, 1]
    # the OpenAI server's chat route encodes a whole conversation the same way
    conv = [{"role": "system", "content": "1+1"}, {"role": "user", "content": "50+98-54"}]
    assert encode_conversations(tok, [conv]) == with_system


def test_plain_format_is_bos_plus_text_and_system_is_a_prefix(chat_tok, plain_tok):
    for tok in (plain_tok, chat_tok):  # a template plays no part in plain format
        bos = tok.bos_token_id
        assert encode_prompts(tok, ["Q: 50+98-54 A: "]) == [[bos, *ids(tok, "Q: 50+98-54 A: ")]]
        few_shot = "Q: 1+1 A: 2. "
        assert encode_prompts(tok, ["Q: 3-5 A: "], "plain", few_shot) == [
            [bos, *ids(tok, few_shot + "Q: 3-5 A: ")]
        ]


def test_chat_format_without_a_template_says_what_to_do(plain_tok):
    with pytest.raises(ValueError) as e:
        encode_prompts(plain_tok, ["Q: 1+2 A: "], "chat")
    msg = str(e.value)
    assert "chat template" in msg and "prompt.format = 'plain'" in msg
    assert "chat_template" in msg and "tokenizer_config.json" in msg
    with pytest.raises(ValueError, match=f"tokenizer of {TINY_MODEL} has none"):
        check_prompt_format(plain_tok, "chat", TINY_MODEL)
    check_prompt_format(plain_tok, "plain", TINY_MODEL)  # plain needs no template


def test_format_key_separates_what_changes_the_ids():
    keys = [
        format_key("plain", None),
        format_key("plain", "Q: 1+1 A: 2. "),
        format_key("chat", None),
        format_key("chat", ""),
        format_key("chat", "You are terse."),
        format_key("chat", "You are brief."),
    ]
    assert keys[0] == ""  # plain ids are those of before prompt formats: old keys stay valid
    assert len(set(keys)) == len(keys)


def test_a_template_that_refuses_a_system_message_says_what_to_change(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ bos_token }}{{ messages[0]['content'] }}"
    )
    assert encode_prompts(tok, ["1+1"], "chat") == [[tok.bos_token_id, *ids(tok, "1+1")]]
    with pytest.raises(ValueError, match="System role not supported.*unset prompt.system"):
        encode_prompts(tok, ["1+1"], "chat", system="be brief")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """``caravela serve``'s app on the chat-template copy of the tiny model, for real: uvicorn
    on 127.0.0.1, ``--prompt-format chat --system 1+1`` (completions formatted as in training)."""
    import socket
    import threading
    import time

    import uvicorn

    from inference_server.openai_api import create_app
    from inference_server.serve import build_engine

    model = chat_model(tmp_path_factory.mktemp("served") / "chat")
    engine, tok = build_engine(model, "transformers", "float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, tok, "chat", prompt_format="chat", system="1+1")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tok
    srv.should_exit = True
    thread.join(10)


def test_serve_encodes_chat_and_completions_like_training(chat_server):
    """The chat route applies the template once (one BOS: the template's), and with
    ``--prompt-format chat`` a completion prompt gets the ids a chat-format run trains on;
    a stop string cuts the text."""
    import httpx

    url, tok = chat_server
    conv = [{"role": "system", "content": "1+1"}, {"role": "user", "content": "50+98-54"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": conv, "max_tokens": 4})
    assert r.status_code == 200, r.text
    (ids,) = encode_conversations(tok, [conv])
    assert ids.count(tok.bos_token_id) == 1
    assert r.json()["usage"]["prompt_tokens"] == len(ids)

    body = {"prompt": "50+98-54", "max_tokens": 40, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (trained,) = encode_prompts(tok, ["50+98-54"], "chat", "1+1")
    assert trained == ids and r.json()["usage"]["prompt_tokens"] == len(trained)
    text = r.json()["choices"][0]["text"]
    cut = httpx.post(f"{url}/v1/completions", json={**body, "stop": ["="]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text.split("=")[0] and "=" in text


def test_serve_refuses_a_chat_prompt_format_without_a_template(capsys):
    from orchestrator.cli import main

    assert (
        main(["serve", str(TINY_MODEL), "--backend", "transformers", "--prompt-format", "chat"])
        == 2
    )
    assert "chat template" in capsys.readouterr().err
