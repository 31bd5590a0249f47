"""Per-token logprobs of fixed token sequences under a causal LM: the weight-sync probe's number.

After a weight push the driver compares, on a few held-out prompts, what every engine
computes with what the trainer computes (``inference_server.weights.probe_diff``); equal
numbers mean equal weights. This module is the plain definition of that number: one
forward pass per sequence, log-softmax of the fp32 logits at T = 1. The transformers
engine computes it this way; the trainer computes the same number through its chunked,
FSDP-aware path (``trainer.logprobs.sequence_logprobs``, which ``tests/common`` checks
against this one) and vLLM through its prompt logprobs. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sequence_logprobs(model: nn.Module, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """Logprob of every token after the first of each sequence (T = 1, no grad).

    model: a HF causal LM, ``model(input_ids=[1, L]).logits`` of shape ``[1, L, V]``.
    Returns one list of ``len(seq) - 1`` floats per sequence. One sequence at a time,
    so the ``[L, V]`` fp32 logits of the longest sequence are the peak extra memory.
    """
    device = next(model.parameters()).device
    out: list[list[float]] = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([list(seq)], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(lp.tolist())
    return out
