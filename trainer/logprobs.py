"""Per-token logprobs of sampled tokens without materialising full-vocabulary logits.

``token_logprobs(hidden [N, H], weight [V, H], targets [N])`` runs the LM head in
chunks of ``chunk_size`` rows: each chunk's ``[chunk, V]`` fp32 logits live only
while that chunk is processed, in forward and again (recomputed) in backward.
Peak extra memory is ``chunk_size * V * 4`` bytes instead of ``N * V * 4``
(at N = 16k tokens and Qwen2's 152k vocabulary: 10 GB -> 80 MB with chunk 128).

The gradient of ``log softmax(z)[t]`` w.r.t. the logits ``z`` is
``onehot(t) - softmax(z)``, so backward needs only the recomputed chunk logits.
Under ``torch.autocast`` (mixed precision) the head's matmuls run in the autocast dtype,
in backward too (its autocast state is the forward's, as ``torch.amp.custom_bwd`` would
restore it), while the log-softmax, entropy and logit gradient stay fp32.

``micro_batch_logprobs`` runs a HF causal LM on a ``MicroBatch`` and feeds its
final hidden states to that head: the one path the trainer, the weight-sync probe
and the GPU benchmark share. ``temperature`` T gives the logprobs (and entropies)
of ``softmax(logits / T)``, the distribution an engine sampling at T draws from.
Torch only, so it runs where pydantic is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from trainer.packing import MicroBatch


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = (hidden[sl] @ weight.t()).float() / temperature
            lse = torch.logsumexp(logits, dim=-1)
            logps[sl] = logits.gather(1, targets[sl, None]).squeeze(1) - lse
            probs = torch.softmax(logits, dim=-1)
            entropy[sl] = lse - (probs * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        device = hidden.device.type
        # backward recomputes the logits as forward did, whatever context it is called in
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logps: torch.Tensor, _grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _ChunkedTokenLogprobs._backward(ctx, grad_logps)

    @staticmethod
    def _backward(
        ctx: Any, grad_logps: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            logits = (h @ weight.t()).float() / ctx.temperature
            g = -torch.softmax(logits, dim=-1)
            g.scatter_add_(1, targets[sl, None], torch.ones_like(targets[sl, None], dtype=g.dtype))
            g = g * (grad_logps[sl, None] / ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                # matmul in the activations' dtype (bf16 tensor cores on GPU), sum in fp32
                grad_weight += (g.t().to(h.dtype) @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs ``[N]`` (fp32, differentiable) and entropies ``[N]`` (metric only).

    hidden: ``[N, H]`` final hidden states at the positions that predict ``targets``.
    weight: ``[V, H]`` LM head (output embedding) weight, no bias.
    targets: ``[N]`` long token ids.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] and targets [N], got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out: tuple[torch.Tensor, torch.Tensor] = _ChunkedTokenLogprobs.apply(
        hidden, weight, targets, chunk_size, temperature
    )
    return out


def token_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The naive full-logits computation, for tests and benchmarks."""
    logits = (hidden @ weight.t()).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def hidden_at(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states ``[N, H]`` at the positions that predict completion tokens."""
    dev = next(model.parameters()).device
    mask = None if mb.attention_mask is None else mb.attention_mask.to(dev)
    out = model.base_model(  # type: ignore[operator]
        input_ids=mb.input_ids.to(dev),
        position_ids=mb.position_ids.to(dev),
        attention_mask=mask,
        # transformers reads restarting position ids as sequence boundaries only when there is
        # no KV cache; with a cache, packed sequences would attend to each other.
        use_cache=False,
    )
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[mb.target_index.to(dev)]


class PolicyLogprobs(nn.Module):
    """The model with the logprob path as its ``forward(mb)``. Under FSDP2 this is the root
    module: its forward hooks gather the parameters outside the decoder layers (embeddings,
    final norm, the LM head the chunked path reads directly) and reduce their gradients.

    ``autocast``: the compute dtype of mixed precision (forward under ``torch.autocast`` with
    it, over parameters kept in a wider dtype); None computes in the parameters' dtype.
    Every pass of the policy goes through here (training, old logprobs, the probe)."""

    def __init__(
        self, model: nn.Module, chunk_size: int, autocast: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast

    def compute(self) -> AbstractContextManager[object]:
        """The context the policy's passes run in (also used for the reference model)."""
        if self.autocast is None:
            return nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast)

    def forward(
        self, mb: MicroBatch, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.compute():
            return _micro_batch_logprobs(self.model, mb, self.chunk_size, temperature)


def micro_batch_logprobs(
    model: nn.Module, mb: MicroBatch, chunk_size: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs and entropies ``[N]`` of the completion tokens of a micro-batch under
    ``softmax(logits / temperature)`` (``model``: a causal LM, or a ``PolicyLogprobs``
    around one)."""
    if isinstance(model, PolicyLogprobs):
        out: tuple[torch.Tensor, torch.Tensor] = model(mb, temperature)
        return out
    return _micro_batch_logprobs(model, mb, chunk_size, temperature)


def _micro_batch_logprobs(
    model: nn.Module, mb: MicroBatch, chunk_size: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    head = model.get_output_embeddings()  # type: ignore[operator]
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the chunked logprob path")
    targets = mb.target_ids.to(head.weight.device)
    return token_logprobs(hidden_at(model, mb), head.weight, targets, chunk_size, temperature)


def sequence_logprobs(
    model: nn.Module, sequences: Sequence[Sequence[int]], chunk_size: int = 1024
) -> list[list[float]]:
    """Logprob of every token after the first of each sequence, through the trainer's own
    path (no grad): what the weight-sync probe compares engines against."""
    from trainer.packing import build_packed

    micro = build_packed([(s[:1], s[1:]) for s in sequences], 1 << 20)
    out: list[list[float]] = [[] for _ in sequences]
    with torch.no_grad():
        for mb in micro:
            lp, _ = micro_batch_logprobs(model, mb, chunk_size)
            for local, i in enumerate(mb.sample_ids):
                out[i] = lp[mb.seq_ids.to(lp.device) == local].tolist()
    return out
