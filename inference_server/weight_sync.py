"""vLLM worker extension: receive new weights in buckets, then swap them in at once.

Loaded *inside* vLLM's worker processes (``worker_extension_cls``) and called
through ``LLM.collective_rpc``. Buckets (safetensors bytes) are staged first and
applied together by ``caravela_commit`` with the worker's public
``reload_weights``, so a half-sent update never reaches the model. Raw
``model.load_weights`` is not used: on CPU vLLM repacks weights after loading,
which ``reload_weights`` redoes and a bare load would skip (DESIGN.md).
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def caravela_stage(self, blob: bytes) -> int:
        """Stage one bucket; returns the number of tensors staged so far."""
        from safetensors.torch import load

        staged: dict[str, Any] = getattr(self, "_caravela_staged", {})
        staged.update(load(blob))
        self._caravela_staged = staged
        return len(staged)

    def caravela_discard(self) -> None:
        """Drop a staged update (after a failed or refused transfer)."""
        self._caravela_staged = {}

    def caravela_commit(self) -> int:
        """Load every staged tensor into the model; returns how many were loaded."""
        staged: dict[str, Any] = getattr(self, "_caravela_staged", {})
        self._caravela_staged = {}
        self.reload_weights(weights_iterator=iter(staged.items()))  # type: ignore[attr-defined]
        self._caravela_refresh_tied_head()
        return len(staged)

    def _caravela_refresh_tied_head(self) -> None:
        """Re-derive a tied LM head's kernel weights from the updated embedding.

        vLLM skips ``lm_head.weight`` when embeddings are tied, so the in-place reload
        never processes the head; on CPU its prepacked GEMM weight (``cpu_linear``) then
        keeps computing logits with the OLD embedding (measured: probe error 1.36 nats
        after an embedding update). Re-running the head's own post-load processing
        rebuilds it from the shared, already updated parameter.
        """
        model = self.model_runner.model  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or head.weight is not embed.weight:
            return
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
