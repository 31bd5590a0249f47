"""Inside vLLM's workers: receive new weights in buckets, then swap them in at once.

Two ways in, one way to load:

* ``CaravelaTransferEngine``, a ``vllm.distributed.weight_transfer`` engine registered
  under ``"caravela"`` when this module is imported (vLLM imports it in every worker as the
  ``worker_extension_cls``): the collective push (``inference.weight_sync = "collective"``).
  Each worker joins the trainer's weight-push group (``common.transfer``: gloo on CPU, NCCL
  on CUDA, the same code) and receives the broadcast buckets; vLLM's own
  ``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
  ``finish_weight_update`` drive it. vLLM's built-in ``"nccl"`` engine is not used: its
  transport (PyNccl) has no CPU form, so it could never run in the tests here.
* ``WeightSyncExtension.caravela_stage``: safetensors blobs through ``collective_rpc``
  (``inference.weight_sync = "object_store"``).

Loaded *inside* vLLM's worker processes (``worker_extension_cls``) and called
through ``LLM.collective_rpc``. Buckets (safetensors bytes) are staged first and
applied together by ``caravela_commit`` with the worker's public
``reload_weights``, so a half-sent update never reaches the model. Raw
``model.load_weights`` is not used: on CPU vLLM repacks weights after loading,
which ``reload_weights`` redoes and a bare load would skip (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.transfer import TensorMeta, TransferGroup


def load_staged(vllm_config: Any, model: Any, staged: dict[str, Any]) -> None:
    """Load ``staged`` tensors into vLLM's ``model`` in place (its public reload, which redoes
    the CPU weight repacking), then refresh a tied LM head."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(
        vllm_config,
        model,
        weights_iterator=iter(staged.items()),
        weights_path=None,
        is_checkpoint_format=True,
    )
    refresh_tied_head(model)


def refresh_tied_head(model: Any) -> None:
    """Re-derive a tied LM head's kernel weights from the updated embedding.

    vLLM skips ``lm_head.weight`` when embeddings are tied, so the in-place reload
    never processes the head; on CPU its prepacked GEMM weight (``cpu_linear``) then
    keeps computing logits with the OLD embedding (measured: probe error 1.36 nats
    after an embedding update). Re-running the head's own post-load processing
    rebuilds it from the shared, already updated parameter.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight is not embed.weight:
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


@dataclass
class TransferInit:
    """Where a worker joins the weight-push group: its rank is ``rank_offset`` plus its
    rank within the engine."""

    address: str
    port: int
    rank_offset: int
    world_size: int


@dataclass
class TransferUpdate:
    """One push: what the buckets carry, and why the engine refuses it (``None``: it takes
    it). A refused push is still received whole, so the sender never waits on this worker."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    refuse: str | None = None

    def meta(self) -> list[TensorMeta]:
        return [
            TensorMeta(n, d, tuple(s))
            for n, d, s in zip(self.names, self.dtypes, self.shapes, strict=True)
        ]


def _register() -> None:
    """Make ``"caravela"`` a weight-transfer backend of this process's vLLM."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    class CaravelaTransferEngine(WeightTransferEngine[Any, Any]):
        """vLLM's weight-transfer lifecycle over ``common.transfer`` (gloo or NCCL)."""

        init_info_cls = TransferInit
        update_info_cls = TransferUpdate

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.group: TransferGroup | None = None
            self.staged: dict[str, Any] = {}

        def init_transfer_engine(self, init_info: TransferInit) -> None:
            # formed again (an engine died): the old group is dropped (a receive may still
            # wait in it until it times out)
            p = self.parallel_config
            rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
            self.group = TransferGroup(
                init_info.address, init_info.port, rank, init_info.world_size, str(self.device)
            )

        def start_weight_update(self) -> None:
            self.staged = {}

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # the base class would call torch.accelerator.synchronize(), which raises on CPU
            self.receive_weights(self.parse_update_info(update_info))
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)

        def receive_weights(self, update_info: TransferUpdate) -> None:
            from inference_server.weights import WeightUpdateError, nonfinite

            if self.group is None:
                raise RuntimeError("receive before init_weight_transfer_engine")
            staged = self.group.receive(update_info.meta(), update_info.bucket_bytes)
            problems = [update_info.refuse] if update_info.refuse else nonfinite(staged)
            if problems:
                raise WeightUpdateError("; ".join(problems))
            self.staged = staged

        def finish_weight_update(self) -> None:
            staged, self.staged = self.staged, {}
            load_staged(self.vllm_config, self.model, staged)

        def shutdown(self) -> None:
            if self.group is not None:
                self.group.close()
                self.group = None

    try:
        WeightTransferEngineFactory.register_engine("caravela", CaravelaTransferEngine)
    except ValueError:  # registered already in this process
        pass


try:
    _register()
except ImportError:  # no vLLM here (the transformers backend's hosts import nothing of it)
    pass


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
        refresh_tied_head(self.model_runner.model)  # type: ignore[attr-defined]
        return len(staged)
