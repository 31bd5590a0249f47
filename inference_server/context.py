"""The context-length check every engine runs before generating: prompt + max_tokens must fit.

As OpenAI's API does, a request whose prompt tokens plus ``max_tokens`` exceed the model's
context is refused (never silently clamped): the OpenAI-compatible server answers 400 with
the message.
"""

from __future__ import annotations

from typing import Any

from inference_server.protocol import GenerateRequest

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
"""HF config attributes that hold a model's context length, in the order they are tried."""


class ContextLengthError(ValueError):
    """A request that does not fit in the engine's context; the message says what to lower."""


def model_context(config: Any) -> int | None:
    """The context length a HF model ``config`` declares, or None when it declares none."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(request: GenerateRequest, context: int | None) -> None:
    """Raise ``ContextLengthError`` when ``request`` needs more than ``context`` tokens."""
    prompt, new = len(request.prompt_ids), request.sampling.max_tokens
    if context is None or prompt + new <= context:
        return
    if prompt < context:
        fix = f"lower max_tokens to {context - prompt} or less"
    elif new < context:
        fix = f"shorten the prompt to {context - new} tokens or less"
    else:
        fix = "shorten the prompt and lower max_tokens"
    raise ContextLengthError(
        f"request {request.request_id}: prompt has {prompt} tokens and max_tokens is {new}: "
        f"{prompt + new} tokens exceed the context of {context} the model has; {fix}"
    )
