"""Sequence packing: turn variable-length (prompt, completion) samples into micro-batches.

Two layouts share one ``MicroBatch`` type so the loss never knows which was used:

* ``packed``: sequences laid end to end in rows of at most ``row_tokens`` tokens,
  ``position_ids`` restarting at 0 for each sequence and no 2-D attention mask;
  a micro-batch stacks rows up to ``max_tokens``.
  transformers (>= 5) reads the restarting position ids as sequence boundaries
  and builds a block-diagonal causal mask (sdpa/eager), a ``BlockMask``
  (flex_attention) or variable-length calls (flash-attention), so no token
  attends across a boundary. ``tests/trainer/test_packing.py`` checks that
  packed logprobs, loss and gradients equal the unpacked ones.
* ``padded``: the baseline: one sequence per row, right-padded to the longest
  row of the micro-batch, with a 2-D attention mask.

Bins are filled first-fit-decreasing, which for RL length mixes wastes a few
percent of each row at most.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """Model inputs plus the map from model positions to loss tokens.

    input_ids, position_ids: ``[R, L]`` long.
    attention_mask: ``[R, L]`` (padded layout) or None (packed layout).
    target_index: ``[N]`` flat indices into ``R*L`` of the positions whose next-token
        prediction is a completion token.
    target_ids: ``[N]`` the completion tokens those positions predict.
    seq_ids: ``[N]`` local sequence index (``0..S-1``) of each loss token.
    sample_ids: ``[S]`` index of each local sequence in the step's sample list.
    real_tokens / capacity: tokens carrying data vs slots computed (padding fraction).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    target_index: torch.Tensor
    target_ids: torch.Tensor
    seq_ids: torch.Tensor
    sample_ids: list[int]
    real_tokens: int
    capacity: int


def check_lengths(lengths: Sequence[int], capacity: int) -> None:
    """Raise ``ValueError`` if a sequence cannot fit one micro-batch."""
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(
                f"sequence {i} has {n} tokens, more than the micro-batch budget {capacity}; "
                "raise trainer.max_tokens_per_micro_batch or lower rollout.max_new_tokens"
            )


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose length sums stay within ``capacity``."""
    check_lengths(lengths, capacity)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _targets(prompt_len: int, total_len: int, offset: int) -> range:
    """Positions (in a row) whose next-token prediction is a completion token."""
    return range(offset + prompt_len - 1, offset + total_len - 1)


def build_packed(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens: int,
    row_tokens: int | None = None,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Pack ``(prompt_ids, completion_ids)`` pairs into rows, rows into micro-batches.

    Rows hold at most ``row_tokens`` tokens (raised to the longest sequence); a
    micro-batch stacks as many rows as fit ``max_tokens``. Short rows are filled
    with pad tokens whose positions restart at 0, so they form a dummy sequence
    that nothing attends to. Attention under sdpa/eager costs ``rows * row_len^2``,
    which is why rows stay short there; variable-length kernels do not care.
    """
    lengths = [len(p) + len(c) for p, c in seqs]
    check_lengths(lengths, max_tokens)
    row_len = max(min(row_tokens or max_tokens, max_tokens), max(lengths))
    rows = first_fit_decreasing(lengths, row_len)
    per_mb = max(1, max_tokens // row_len)
    out = []
    for start in range(0, len(rows), per_mb):
        group = rows[start : start + per_mb]
        width = max(sum(lengths[i] for i in row) for row in group)
        ids = torch.full((len(group), width), pad_id)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        tidx: list[int] = []
        tids: list[int] = []
        sids: list[int] = []
        members: list[int] = []
        for r, row in enumerate(group):
            offset = 0
            for i in row:
                prompt, completion = seqs[i]
                n = lengths[i]
                ids[r, offset : offset + n] = torch.tensor([*prompt, *completion])
                pos[r, offset : offset + n] = torch.arange(n)
                tidx.extend(_targets(len(prompt), n, r * width + offset))
                tids.extend(completion)
                sids.extend([len(members)] * len(completion))
                members.append(i)
                offset += n
            pos[r, offset:] = torch.arange(width - offset)
        out.append(
            MicroBatch(
                input_ids=ids,
                position_ids=pos,
                attention_mask=None,
                target_index=torch.tensor(tidx),
                target_ids=torch.tensor(tids),
                seq_ids=torch.tensor(sids),
                sample_ids=members,
                real_tokens=sum(lengths[i] for row in group for i in row),
                capacity=len(group) * width,
            )
        )
    return out


def build_padded(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int, pad_id: int = 0
) -> list[MicroBatch]:
    """Baseline layout: rows of one right-padded sequence, ``rows * longest <= max_tokens``."""
    lengths = [len(p) + len(c) for p, c in seqs]
    check_lengths(lengths, max_tokens)
    groups: list[list[int]] = []
    for i in range(len(seqs)):
        width = max([lengths[j] for j in groups[-1]] + [lengths[i]]) if groups else 0
        if groups and (len(groups[-1]) + 1) * width <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for members in groups:
        width = max(lengths[i] for i in members)
        ids = torch.full((len(members), width), pad_id)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        tidx: list[int] = []
        tids: list[int] = []
        sids: list[int] = []
        for row, i in enumerate(members):
            prompt, completion = seqs[i]
            n = lengths[i]
            ids[row, :n] = torch.tensor(list(prompt) + list(completion))
            mask[row, :n] = 1
            tidx.extend(_targets(len(prompt), n, row * width))
            tids.extend(completion)
            sids.extend([row] * len(completion))
        out.append(
            MicroBatch(
                input_ids=ids,
                position_ids=torch.arange(width).expand(len(members), width).clone(),
                attention_mask=mask,
                target_index=torch.tensor(tidx),
                target_ids=torch.tensor(tids),
                seq_ids=torch.tensor(sids),
                sample_ids=members,
                real_tokens=sum(lengths[i] for i in members),
                capacity=len(members) * width,
            )
        )
    return out


def padding_fraction(batches: Sequence[MicroBatch]) -> float:
    """Share of computed token slots that hold padding."""
    cap = sum(b.capacity for b in batches)
    return 1.0 - sum(b.real_tokens for b in batches) / cap if cap else 0.0


def shard(lengths: list[int], rank: int, world: int) -> list[int]:
    """Indices of the samples ``rank`` trains on: longest first to the least-loaded rank."""
    load = [0] * world
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += lengths[i]
        if r == rank:
            mine.append(i)
    return sorted(mine)


def minibatches(lengths: list[int], parts: int) -> list[list[int]]:
    """Sample indices split, in order, into ``min(parts, len(lengths))`` non-empty runs of
    near-equal token counts (``lengths``): the mini-batches of one batch's updates."""
    n = len(lengths)
    parts = max(1, min(parts, n))
    cumulative = list(itertools.accumulate(lengths))  # tokens in samples [0, i]
    bounds = [0]
    for k in range(1, parts):
        target = cumulative[-1] * k / parts
        # the run ends before sample b: leave at least one sample to each later run
        candidates = range(bounds[-1] + 1, n - (parts - k) + 1)
        bounds.append(min(candidates, key=lambda b: (abs(cumulative[b - 1] - target), b)))
    bounds.append(n)
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
