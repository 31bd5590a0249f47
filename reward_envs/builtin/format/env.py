"""Reward function of the built-in ``format`` env: the completion is exactly its tagged blocks.

``score(prompt, completion, answer="", tags=None)`` is 1.0 when the completion
is made of one block per tag, ``<tag>…</tag>``, in the given order, else 0.0. Stdlib only
(``caravela-env.toml`` declares no requirements). ``answer`` is accepted and ignored, so the
env can sit next to a correctness env on the same dataset.

Rules:

* each tag's opening ``<tag>`` and closing ``</tag>`` appear exactly once in the completion
  (so tags are neither repeated nor nested inside another block);
* the blocks come in the order of ``tags``;
* each block holds something other than whitespace;
* only whitespace is allowed before, between and after the blocks.

Tags are matched literally and case-sensitively, without attributes (``<think>``, not
``<Think>`` or ``<think id="1">``). ``tags`` is an optional dataset field: a list of tag names
(letters, digits, ``_``, ``-``, ``:`` and ``.``; a name may not start with a digit or
punctuation); missing or null means ``["think", "answer"]``. An empty, repeated or malformed
tag list is a configuration error (``ValueError``), reported as an error result rather than
scored 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

DEFAULT_TAGS = ("think", "answer")
_TAG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")


def check_tags(tags: Any) -> tuple[str, ...]:
    """The tag names as a tuple; ValueError if they are not a non-empty list of unique names."""
    if isinstance(tags, str) or not isinstance(tags, Sequence) or not tags:
        raise ValueError(f"tags must be a non-empty list of tag names, got {tags!r}")
    names = tuple(tags)
    bad = [t for t in names if not isinstance(t, str) or not _TAG_NAME_RE.fullmatch(t)]
    if bad:
        raise ValueError(f"invalid tag names {bad!r} in {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated tag names in {names!r}")
    return names


def layout_re(tags: tuple[str, ...]) -> re.Pattern[str]:
    """Whole-completion pattern: the tagged blocks in order, whitespace around them."""
    blocks = r"\s*".join(rf"<{re.escape(t)}>(.*?)</{re.escape(t)}>" for t in tags)
    return re.compile(rf"\s*{blocks}\s*", re.DOTALL)


def each_tag_once(completion: str, tags: tuple[str, ...]) -> bool:
    """Whether every tag opens and closes exactly once in the completion."""
    return all(completion.count(f"<{t}>") == 1 and completion.count(f"</{t}>") == 1 for t in tags)


def score(
    prompt: str,
    completion: str,
    answer: str = "",
    tags: Sequence[str] | None = None,
    **fields: Any,
) -> float:
    """1.0 if the completion is exactly its tagged blocks (see the module docstring), else 0.0."""
    del prompt, answer, fields
    names = DEFAULT_TAGS if tags is None else check_tags(tags)
    if not each_tag_once(completion, names):
        return 0.0
    m = layout_re(names).fullmatch(completion)
    if m is None or any(not block.strip() for block in m.groups()):
        return 0.0
    return 1.0
