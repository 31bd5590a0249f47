"""Prompt text -> engine token ids, the one way every caller does it.

Two formats (``PromptFormat``):

* ``plain``: the prompt is encoded without special tokens and the BOS id prepended by hand
  (when the tokenizer has one), so tokenizers with or without a BOS post-processor give
  the same ids to every engine. A ``system`` text is put before the prompt as it is (a
  few-shot prefix, an instruction): ``[BOS] + ids(system + text)``.
* ``chat``: the tokenizer's chat template over ``[{"role": "system", "content": system},
  {"role": "user", "content": text}]`` (no system message when ``system`` is None), with
  the generation prompt (``add_generation_prompt=True``). The template decides the special
  tokens (BOS included); nothing is added by hand. A tokenizer without a chat template is
  refused with a message saying what to do.

Training (rollouts, the pre-tokenized store, the prefetcher), evaluation and the OpenAI
server's chat route all encode through this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

PromptFormat = Literal["plain", "chat"]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer_config.json``'s
    ``chat_template``, or a ``chat_template.jinja`` file next to it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def check_prompt_format(tokenizer: Any, format: PromptFormat, where: object = "the model") -> None:
    """Raise ``ValueError`` when ``format`` cannot be applied with ``tokenizer``: ``chat``
    needs a chat template. ``where`` names the model directory in the message."""
    if format not in ("plain", "chat"):
        raise ValueError(f"prompt format {format!r} is not one of 'plain', 'chat'")
    if format == "chat" and not has_chat_template(tokenizer):
        raise ValueError(
            f"prompt.format = 'chat' applies the tokenizer's chat template, but the tokenizer "
            f"of {where} has none: set prompt.format = 'plain' (BOS + prompt text), or give "
            'the tokenizer a template (a "chat_template" entry in its tokenizer_config.json, '
            "or a chat_template.jinja file in the model directory)"
        )


def chat_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation a prompt becomes in ``chat`` format."""
    user = {"role": "user", "content": text}
    return [user] if system is None else [{"role": "system", "content": system}, user]


def encode_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]]
) -> list[list[int]]:
    """Token ids of each conversation under the tokenizer's chat template, ending with the
    generation prompt (the assistant's turn starts next)."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    check_prompt_format(tokenizer, "chat")
    if not conversations:
        return []
    try:
        ids = tokenizer.apply_chat_template(
            [list(c) for c in conversations],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    except TemplateError as e:  # e.g. a template that takes no system message
        roles = sorted({m["role"] for c in conversations for m in c})
        raise ValueError(
            f"the tokenizer's chat template refused a conversation with roles {roles}: {e}; "
            "if it takes no system message, unset prompt.system (or put the instruction in "
            "the prompts)"
        ) from e
    if isinstance(ids, Mapping):  # a BatchEncoding, where return_dict is not honoured
        ids = ids["input_ids"]
    return [list(x) for x in ids]


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    format: PromptFormat = "plain",
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt text in ``format`` (module docstring)."""
    if format == "chat":
        return encode_conversations(tokenizer, [chat_messages(t, system) for t in texts])
    check_prompt_format(tokenizer, format)
    prefix = system or ""
    encoded = tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [list(ids) if bos is None else [bos, *ids] for ids in encoded]


def format_key(format: PromptFormat, system: str | None) -> str:
    """What, besides the tokenizer and the text, decides a prompt's ids: ``""`` for plain
    prompts with no system text (the ids of before prompt formats existed), else a short
    hash of format and system text (the pre-tokenized store keys its files by it)."""
    if format == "plain" and not system:
        return ""
    h = hashlib.sha256(f"{format}\0{system is not None}\0{system or ''}".encode())
    return f"{format}-{h.hexdigest()[:16]}"
