"""PPO's critic: a value model on the trainer ranks, sharded and checkpointed like the policy.

``Critic`` is a causal LM's backbone (``model.base_model``: the transformer without its LM
head) and a scalar head. It reads the same ``MicroBatch`` as the policy and returns one
value per completion token: the hidden state at the position that predicts token ``t`` is
the state before emitting it, so ``values[t]`` estimates ``V(s_t)``. Built from the
policy's own architecture and weights (``trainer.loss.critic_model`` unset) or from
another, smaller HF causal LM with the same tokenizer; the head starts at zero, so the
first values are 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from trainer.packing import MicroBatch


class Critic(nn.Module):
    """Backbone + ``Linear(hidden, 1)``; ``forward(mb) -> values [N]`` (float32).
    ``autocast``: mixed precision's compute dtype, as the policy's (``PolicyLogprobs``)."""

    def __init__(self, lm: nn.Module, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.autocast = autocast
        self.backbone: nn.Module = lm.base_model  # type: ignore[assignment]
        config: Any = lm.config
        hidden = int(config.hidden_size)
        dtype = next(lm.parameters()).dtype
        self.head = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.to(next(lm.parameters()).device)

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        dev = self.head.weight.device
        mask = None if mb.attention_mask is None else mb.attention_mask.to(dev)
        compute = (
            nullcontext()
            if self.autocast is None
            else torch.autocast(dev.type, dtype=self.autocast)
        )
        with compute:
            out = self.backbone(
                input_ids=mb.input_ids.to(dev),
                position_ids=mb.position_ids.to(dev),
                attention_mask=mask,
                use_cache=False,  # packed rows: restarting positions are sequence boundaries
            )
            hidden = out.last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])[mb.target_index.to(dev)]
            values: torch.Tensor = self.head(hidden).squeeze(-1).float()
        return values


def shard_critic(critic: Critic, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over the default process group, as ``trainer.trainer.fsdp2`` shards the
    policy: one unit per decoder layer, the rest (embeddings, norm, head) in the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = set(getattr(critic.backbone, "_no_split_modules", None) or ())
    if not layers:
        raise ValueError(
            f"{type(critic.backbone).__name__} names no decoder layer class; FSDP2 needs one "
            "unit per layer: use trainer.sharding = 'replicate'"
        )
    for m in list(critic.backbone.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mp_policy=mp)
    fully_shard(critic, mp_policy=mp)
