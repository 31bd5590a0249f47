"""Prompt text -> engine token ids, the one way every caller does it.

The prompt is encoded without special tokens and the BOS id prepended by hand
(when the tokenizer has one), so tokenizers with or without a BOS
post-processor give the same ids to every engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + ids(text)`` for each text."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [list(ids) if bos is None else [bos, *ids] for ids in encoded]
