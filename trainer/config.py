"""Trainer configuration: optimiser, loss variant, batching and memory switches.

Parsed and validated before torch is imported (STYLE.md, point 1), so this
module imports pydantic only (``StrictModel`` and ``default_type`` come from
``common.config``, the base every component's config shares).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from common.config import StrictModel, default_type


class _ClippedLoss(StrictModel):
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    """Lower clip range: below ``1 - eps_low`` the ratio stops pushing negative-advantage
    tokens further down."""
    eps_high: float = Field(0.2, ge=0.0)
    """Upper clip range: above ``1 + eps_high`` the ratio stops pushing positive-advantage
    tokens further up."""
    kl_beta: float = Field(0.0, ge=0.0)
    """Weight of the k3 KL penalty to the initial (reference) model; 0 disables it and the
    reference model is never loaded."""
    tis_cap: float | None = Field(None, ge=1.0)
    """Truncated importance sampling against the inference engine's logprobs: per-token weight
    ``min(pi_train / pi_engine, tis_cap)``. None turns the correction off."""


class GRPOLoss(_ClippedLoss):
    """GRPO (DeepSeekMath): token ratios, mean per sequence, then mean over sequences."""

    type: Literal["grpo"] = "grpo"
    """Selects this loss."""


class DrGRPOLoss(_ClippedLoss):
    """Dr. GRPO: token ratios, sum divided by sequences x max completion length (no length bias)."""

    type: Literal["dr_grpo"] = "dr_grpo"
    """Selects this loss."""


class DAPOLoss(_ClippedLoss):
    """DAPO: clip-higher (``eps_high > eps_low``) and a token-level mean over the whole step."""

    type: Literal["dapo"] = "dapo"
    """Selects this loss."""
    eps_high: float = Field(0.28, ge=0.0)
    """Upper clip range; DAPO's clip-higher default keeps low-probability tokens explorable."""


class GSPOLoss(_ClippedLoss):
    """GSPO: one importance ratio per sequence (geometric mean of token ratios)."""

    type: Literal["gspo"] = "gspo"
    """Selects this loss."""
    eps_low: float = Field(3e-4, ge=0.0, lt=1.0)
    """Lower clip range; sequence ratios sit close to 1, so GSPO clips tightly."""
    eps_high: float = Field(4e-4, ge=0.0)
    """Upper clip range for the sequence-level ratio."""


class DPOLoss(StrictModel):
    """DPO on preference pairs (``algorithm = "dpo"``): the policy's sequence logprob margin
    between chosen and rejected completions, against a frozen reference (the initial
    policy), pushed through ``variant`` (trainer/dpo.py)."""

    type: Literal["dpo"] = "dpo"
    """Selects this loss."""
    variant: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """``sigmoid``: DPO's ``-log sigmoid(beta d)``; ``ipo``: IPO's squared loss (per-token
    normalised log ratios, as TRL); ``hinge``: SLiC's ``relu(1 - beta d)``."""
    beta: float = Field(0.1, gt=0.0)
    """Strength of the implicit KL to the reference: larger keeps the policy closer to it
    (for ``ipo``, the margin target is ``1 / (2 beta)``)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the probability that a pair's preference is wrong (``sigmoid``
    only)."""
    tis_cap: None = None
    """Not used by DPO (the loss has no importance ratio to the engine); always None."""

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> DPOLoss:
        if self.label_smoothing > 0 and self.variant != "sigmoid":
            raise ValueError(
                f"trainer.loss.label_smoothing applies to the sigmoid variant only; unset it "
                f"or set trainer.loss.variant = 'sigmoid' (got {self.variant!r})"
            )
        return self


class PPOLoss(StrictModel):
    """PPO with a critic (``algorithm = "ppo"``): token-level GAE on the env's score (on the
    last token) minus an optional per-token KL penalty, the clipped surrogate, and a value
    model trained alongside with a clipped value loss (trainer/ppo.py, trainer/critic.py)."""

    type: Literal["ppo"] = "ppo"
    """Selects this loss."""
    eps: float = Field(0.2, gt=0.0, lt=1.0)
    """Policy clip range: the ratio is clipped to ``[1 - eps, 1 + eps]``."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount per token."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE's lambda: 1 is the Monte-Carlo return minus the value, 0 the one-step TD error."""
    value_clip: float | None = Field(0.2, gt=0.0)
    """The critic's new values are clipped to ``old +- value_clip`` in the value loss (the
    larger of the clipped and unclipped squared errors is taken); None: unclipped."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Per-token KL penalty ``kl_coef x (logp - logp_ref)`` subtracted from the reward (the
    reference is the initial policy, loaded only when this is > 0)."""
    whiten_advantages: bool = True
    """Normalise the advantages over the batch's tokens (mean 0, std 1; across ranks)."""
    critic_lr: float = Field(1e-4, gt=0.0, le=1.0)
    """The critic's AdamW learning rate (constant; ``trainer.lr`` is the policy's)."""
    critic_model: Path | None = None
    """HF causal LM whose backbone the critic is (same tokenizer as the policy); None: the
    policy's model. A scalar head starting at zero is added."""
    tis_cap: None = None
    """Not used by PPO; always None."""


LossConfig = Annotated[
    GRPOLoss | DrGRPOLoss | DAPOLoss | GSPOLoss | DPOLoss | PPOLoss, Field(discriminator="type")
]


class TrainerConfig(StrictModel):
    """How the trainer group turns scored groups into a weight update."""

    lr: float = Field(1e-4, gt=0.0, le=1.0)
    """AdamW peak learning rate, reached at the end of the warm-up (``lr_schedule`` says what
    follows). 1e-4 learns the tiny model; 5e-4 collapsed it."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW (beta1, beta2)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up, in optimizer steps (``updates_per_batch`` per batch): the
    k-th update (from 1) runs at ``lr x k / warmup_steps``. 0: none."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """The learning rate after the warm-up: ``constant`` stays at ``lr``; ``linear`` and
    ``cosine`` decay from ``lr`` to ``min_lr_ratio x lr`` over the rest of the run (its
    ``steps x updates_per_batch`` optimizer steps; a step with no batch to train on takes
    none). The schedule's position is checkpointed; a resumed run continues it, over its
    own ``steps`` (trainer/schedule.py)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Where ``linear`` and ``cosine`` end, as a fraction of ``lr`` (0: decay to zero; 0.1
    is a common choice). Only with a decaying ``lr_schedule``."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value before every optimizer step."""
    updates_per_batch: int = Field(1, ge=1)
    """Optimizer steps per batch (PPO's mu): the batch's samples are split, in order and
    balanced by tokens, into this many mini-batches (fewer if there are fewer samples), one
    step each. The importance ratio's denominator is the policy before the first of them, so
    from the second on the ratio moves away from 1 and the clip ranges act; with 1, the ratio
    is exactly 1 (the clip never acts) and there is no extra forward pass. One batch still
    makes one new policy version for the engines."""
    loss: LossConfig = Field(default_factory=GRPOLoss)
    """Policy loss; pick with ``loss.type`` = grpo | dr_grpo | dapo | gspo, dpo (preference
    pairs: ``algorithm = "dpo"`` sets it) or ppo (a critic: ``algorithm = "ppo"``)."""

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_type_defaults_to_grpo(cls, v: object) -> object:
        # ``--set trainer.loss.tis_cap=2`` alone means the default loss with that field
        return default_type(v, "grpo")

    layout: Literal["packed", "padded"] = "packed"
    """``packed`` lays several sequences end to end per row (no attention across them);
    ``padded`` is one right-padded sequence per row (the baseline)."""
    max_tokens_per_micro_batch: int = Field(4096, ge=16)
    """Token budget of one forward/backward pass; a step accumulates gradients over as many
    micro-batches as its samples need."""
    pack_row_tokens: int = Field(128, ge=16)
    """Length of one packed row (raised to the longest sequence). Short rows keep sdpa's
    dense block mask cheap (the embedded default's ~45-token sequences on CPU: 0.85 s per
    172-sequence step at 128, 1.21 s at 512, 0.88 s padded); with flash/flex
    variable-length kernels make it large."""
    logprob_chunk_size: int = Field(1024, ge=1)
    """Rows of the LM head computed at once; bounds the fp32 logits held in memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory, ~18-25% slower). A per-site switch:
    off on MN5, on at Deucalion."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    """transformers attention kernel. Packed rows need one that honours sequence boundaries:
    sdpa/eager (dense block mask), flex_attention (block mask) or flash_attention_2 (varlen)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: the forward and backward passes' matmuls (``torch.autocast``, or FSDP2's
    ``MixedPrecisionPolicy``, over ``master_dtype`` parameters) and the weights pushed to the
    engines, which are loaded and serve in this dtype. bfloat16 on GPUs, float32 on CPU."""
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the parameters and the optimizer state (the weights AdamW updates).
    ``dtype = "bfloat16"`` with float32 here is mixed precision, the recommended GPU setting.
    ``"bfloat16"`` here (with ``dtype = "bfloat16"``) is pure bf16, kept only for comparison:
    an update smaller than half the bf16 spacing at the weight (0.2-0.4% of its magnitude)
    rounds away, so at small learning rates most weights never move."""
    seed: int = 0
    """Seed for torch's RNG in the trainer."""
    ranks_per_node: int = Field(1, ge=1, le=16)
    """Data-parallel ranks on each trainer node (one per GPU on GPU nodes; 4 on MN5)."""
    cpus_per_rank: float = Field(2.0, gt=0.0)
    """Ray CPUs each rank reserves (and its torch threads)."""
    max_restarts: int = Field(3, ge=0)
    """Times in one run the trainer ranks may be re-formed after one of them died (on Ray):
    every rank is stopped, a new process group formed, and the run goes on from the last
    checkpoint, replaying the prompts after it. One more death ends the run."""
    sharding: Literal["replicate", "fsdp2"] = "replicate"
    """``replicate``: every rank holds the whole model and optimizer, gradients are summed
    (DDP; enough while a model and its Adam state fit one GPU). ``fsdp2``: parameters,
    gradients and optimizer state sharded over all ranks with ``fully_shard`` (one unit per
    decoder layer), for models that do not fit; the update is the same."""

    @model_validator(mode="after")
    def _master_holds_compute(self) -> TrainerConfig:
        if self.master_dtype == "bfloat16" and self.dtype == "float32":
            raise ValueError(
                "trainer.master_dtype = 'bfloat16' with trainer.dtype = 'float32' would compute "
                "in float32 over bf16 weights; set trainer.master_dtype = 'float32' (or both "
                "to 'bfloat16' for pure bf16)"
            )
        return self

    @model_validator(mode="after")
    def _min_lr_needs_decay(self) -> TrainerConfig:
        if self.min_lr_ratio > 0 and self.lr_schedule == "constant":
            raise ValueError(
                f"trainer.min_lr_ratio = {self.min_lr_ratio} is where a decaying schedule ends, "
                "but trainer.lr_schedule is 'constant'; set trainer.lr_schedule = 'cosine' "
                "(or 'linear'), or unset trainer.min_lr_ratio"
            )
        return self

    @model_validator(mode="after")
    def _chunk_fits(self) -> TrainerConfig:
        if self.logprob_chunk_size > self.max_tokens_per_micro_batch:
            raise ValueError(
                f"logprob_chunk_size ({self.logprob_chunk_size}) exceeds "
                f"max_tokens_per_micro_batch ({self.max_tokens_per_micro_batch}); lower it"
            )
        return self
