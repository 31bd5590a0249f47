"""Chunked LM-head logprobs equal the full-logits computation, values and gradients."""

import pytest
import torch

from trainer.logprobs import token_logprobs, token_logprobs_reference


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_full_logits(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 97, (50,), generator=g)
    upstream = torch.randn(50, generator=g, dtype=torch.float64)

    ref = token_logprobs_reference(h, w, t, temperature)
    (ref.double() * upstream).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    out, entropy = token_logprobs(h, w, t, chunk_size=chunk, temperature=temperature)
    (out.double() * upstream).sum().backward()

    assert torch.allclose(out.double(), ref.double(), atol=1e-5)
    assert torch.allclose(h.grad, gh, atol=1e-5)
    assert torch.allclose(w.grad, gw, atol=1e-5)
    probs = torch.softmax((h @ w.t()).float() / temperature, -1)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1), atol=1e-4)


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="hidden must be"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
