"""The probe's number: the plain definition in ``common.logprobs`` and the trainer's chunked
path give the same logprobs, so an engine computing either passes the probe on equal
weights."""

import torch

from common.logprobs import sequence_logprobs
from trainer.logprobs import sequence_logprobs as trainer_sequence_logprobs


def test_plain_definition_matches_the_trainers_chunked_path(random_llama):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (2, 9, 17)]
    plain = sequence_logprobs(random_llama, seqs)
    chunked = trainer_sequence_logprobs(random_llama, seqs, chunk_size=4)
    assert [len(p) for p in plain] == [1, 8, 16]
    for p, c in zip(plain, chunked, strict=True):
        assert torch.allclose(torch.tensor(p), torch.tensor(c), atol=1e-5)
    # the logprobs of a distribution: each token's is at most 0, and not all the same
    assert max(max(p) for p in plain) <= 0.0 and len({round(x, 4) for x in plain[2]}) > 1
