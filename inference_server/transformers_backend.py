"""HF ``generate`` backend: batched sampling with per-token logprobs, in the caller's process.

For tiny models it beats vLLM on CPU (DESIGN.md: break-even near 20M
parameters).

``TransformersEngine`` wraps a model object it is given (held-out evaluation);
``DirTransformersEngine`` loads its own from a directory (the run's engine, as a Ray
actor or in the driver's process; ``caravela serve``) and then
takes version-tagged weight updates checked like the vLLM engine's. Both are
thread-safe: calls are served one at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.logprobs import sequence_logprobs
from common.transfer import TensorMeta, TransferGroup, buckets
from common.weights import HostState, weights_checksum
from inference_server.context import check_context, model_context
from inference_server.protocol import Completion, GenerateRequest, GenerateResult, SamplingParams
from inference_server.weights import as_tensors, check_update, probe_diff, served_shapes


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (without) the stop string that ends first in it (ties: the first in
    ``stop``), as vLLM cuts it; all of ``text`` if none occurs."""
    found = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return text[: min(found, key=lambda f: f[0])[1]] if found else text


class StopStrings:
    """A ``generate`` stopping criterion (HF's ``StoppingCriteria`` interface): ends a row at
    the first token after which its decoded completion contains one of ``stop``, and records
    that length (``ends``: row -> tokens).

    The same rule vLLM applies (its default ``include_stop_str_in_output=False``): the
    completion's token ids and logprobs run to, and include, the token that completed the
    stop string (the model sampled it, the trainer trains on it, as on EOS); the text ends
    before the stop string (``cut_at_stop``). Rows already ended by EOS are left to HF.

    After each token only the last ``window`` tokens of each open row are decoded (at least
    4 tokens per character of the longest stop string, for byte-level pieces, plus 16); a
    row whose window holds a stop string is confirmed on its whole decoded completion."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], width: int, eos_id: int | None):
        self.tokenizer, self.stop, self.width, self.eos_id = tokenizer, list(stop), width, eos_id
        self.window = 4 * max(len(s) for s in self.stop) + 16
        self.ends: dict[int, int] = {}
        self.eos_rows: set[int] = set()

    def _holds_stop(self, rows: list[list[int]]) -> list[bool]:
        if not rows:  # batch_decode([]) would decode one empty row
            return []
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [any(s in t for s in self.stop) for t in texts]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        length = input_ids.shape[1] - self.width  # tokens generated so far
        for i, t in enumerate(input_ids[:, -1].tolist()):
            if t == self.eos_id and i not in self.ends:
                self.eos_rows.add(i)  # ended by EOS now (HF pads it from here on)
        closed = self.ends.keys() | self.eos_rows
        todo = [i for i in range(len(input_ids)) if i not in closed]
        tails = input_ids[:, -min(length, self.window) :].tolist()
        holds = self._holds_stop([tails[i] for i in todo])
        hits = [i for i, hit in zip(todo, holds, strict=True) if hit]
        whole = [input_ids[i, self.width :].tolist() for i in hits]
        for i, hit in zip(hits, self._holds_stop(whole), strict=True):
            if hit:
                self.ends[i] = length
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        done[list(self.ends)] = True
        return done


class TransformersEngine:
    """Generates completions for tokenized prompts with a HF causal LM."""

    def __init__(
        self, model: Any, tokenizer: Any, engine_id: str = "hf-0", batch_size: int = 512
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine_id = engine_id
        self.batch_size = batch_size
        self.version = 0
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.context = model_context(model.config)
        """Prompt + max_tokens limit (the config's ``max_position_embeddings``); None: none."""
        self.lock = threading.Lock()

    def served_version(self) -> int:
        """``version``, callable through a Ray actor handle."""
        return self.version

    def shutdown(self) -> None:
        """Nothing to stop: the model lives in the caller's process (the vLLM engine's
        counterpart stops its engine processes)."""

    def inflight(self) -> int:
        """Requests being generated now (0 or 1 call's worth: calls are serialised)."""
        return int(self.lock.locked())

    def pid(self) -> int:
        """This process's id (tests kill or stop an engine actor by it)."""
        return os.getpid()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Sample ``sampling.n`` completions per request; one call's requests share params.
        Raises ``ContextLengthError`` (nothing generated) if a request does not fit."""
        for r in requests:
            check_context(r, self.context)
        if not requests:
            return []
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampling.model_dump_json(), []).append(i)
        if len(groups) > 1:  # one generate() call per distinct SamplingParams
            out: list[GenerateResult | None] = [None] * len(requests)
            for idx in groups.values():
                for i, res in zip(idx, self.generate([requests[i] for i in idx]), strict=True):
                    out[i] = res
            return [r for r in out if r is not None]
        with self.lock:
            return self._generate_same(requests)

    def _generate_same(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        params = requests[0].sampling
        flat = [r.prompt_ids for r in requests for _ in range(params.n)]
        completions: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(flat), self.batch_size):
                completions.extend(self._generate(flat[start : start + self.batch_size], params))
        finally:
            self.model.train(was_training)
        n = params.n
        return [
            GenerateResult(request_id=r.request_id, completions=completions[i * n : (i + 1) * n])
            for i, r in enumerate(requests)
        ]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], p: SamplingParams) -> list[Completion]:
        width = max(len(x) for x in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(prompts):
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        device = self.model.device
        sampling: dict[str, Any] = {"do_sample": False}
        if p.temperature > 0:
            sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p}
            sampling["top_k"] = p.top_k  # 0 = off (HF's generation default would be 50)
        stops = StopStrings(self.tokenizer, p.stop, width, self.eos_id) if p.stop else None
        if stops is not None:
            from transformers import StoppingCriteriaList

            sampling["stopping_criteria"] = StoppingCriteriaList([stops])
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=p.max_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling,
        )
        new = out.sequences[:, width:].cpu()
        scores = torch.stack(out.scores, dim=1).float().cpu()  # [B, steps, V], processed logits
        logps = torch.log_softmax(scores, dim=-1).gather(2, new[:, :, None])[:, :, 0]
        result = []
        for i, (row, lp) in enumerate(zip(new.tolist(), logps.tolist(), strict=True)):
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            while end > 0 and row[end - 1] == self.pad_id and self.pad_id != self.eos_id:
                end -= 1  # padding after the row ended early
            stopped = stops is not None and i in stops.ends
            if stops is not None and stopped:
                end = stops.ends[i]  # the token that completed a stop string ends the row
            ended = stopped or end < p.max_tokens or row[end - 1] == self.eos_id
            reason = "stop" if ended else "length"
            tokens = row[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            result.append(
                Completion(
                    token_ids=tokens,
                    text=cut_at_stop(text, p.stop),
                    logprobs=lp[:end],
                    finish_reason=reason,
                    policy_version=self.version,
                    engine_id=self.engine_id,
                )
            )
        return result


class DirTransformersEngine(TransformersEngine):
    """A transformers engine that loads its own model from ``model_dir`` and takes updates.

    The model lives on ``device``: by default the GPU when CUDA is available (as a Ray actor
    with ``num_gpus=1``, the one Ray reserved for it through ``CUDA_VISIBLE_DEVICES``), else
    the CPU. Inputs go to the model's device; token ids, logprobs and checksums come back
    on the CPU, and host tensors of a weight update are copied onto the device as they load.
    The CUDA path has not run on a GPU yet (no GPU where it was written)."""

    def __init__(
        self,
        model_dir: Path,
        engine_id: str = "hf-0",
        dtype: str = "float32",
        batch_size: int = 512,
        threads: int = 0,
        seed: int | None = None,
        device: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"model dir {model_dir} has no config.json")
        if threads:
            torch.set_num_threads(threads)
        if seed is not None:  # sampling draws from this process's RNG: a run repeats its seed
            torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        # the GPU Ray reserved for this actor (CUDA_VISIBLE_DEVICES), else the CPU
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        super().__init__(model, tok, engine_id=engine_id, batch_size=batch_size)
        self.shapes = served_shapes(model_dir)
        self.transfer: Any = None

    def update_weights(
        self, version: int, state: Mapping[str, torch.Tensor] | HostState, bucket_bytes: int = 0
    ) -> dict[str, float]:
        """Check like the vLLM engine does, then load; in-flight calls finish first."""
        state = as_tensors(state)
        check_update(self.engine_id, self.version, version, self.shapes, state)
        with self.lock:
            self.model.load_state_dict(dict(state), strict=False)
            self.version = version
        return {"weight_sync/buckets": 1.0}

    # -- the collective weight push (common.transfer) ----------------------------------------
    def transfer_workers(self) -> int:
        """Members this engine adds to the weight-push group: itself."""
        return 1

    def join_transfer(self, address: str, port: int, rank: int, world: int) -> None:
        """Join the weight-push group as ``rank`` (blocks until every member has joined)."""
        # formed again (an engine died): the old group is dropped, not shut down, as a
        # receive may still be waiting in it on another thread (it times out there)
        self.transfer = TransferGroup(address, port, rank, world, str(self.model.device))

    def receive_weights(
        self, version: int, meta: list[TensorMeta], bucket_bytes: int
    ) -> dict[str, float]:
        """Take part in one push as a receiver, then check and load it as ``update_weights``
        does (a refused update is still received whole, so the sender never waits). The
        version this engine serves already is received and dropped: a push repeated after
        the group lost a member, which this engine had taken the first time."""
        state = self.transfer.receive(meta, bucket_bytes)
        sent = {"weight_sync/buckets": float(len(buckets(meta, bucket_bytes)))}
        if version == self.version:  # a push repeated after the group lost a member: had it
            return {**sent, "weight_sync/dropped": 1.0}
        return {**self.update_weights(version, state), **sent}

    def checksum(self) -> str:
        """Hash of the served weights (every engine of a run must agree after a push)."""
        with self.lock:
            state = self.model.state_dict()
            return weights_checksum({name: state[name] for name in self.shapes})

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of every token after the first (T = 1)."""
        with self.lock:
            return sequence_logprobs(self.model, sequences)

    def probe(
        self, sequences: Sequence[Sequence[int]], expected: Sequence[Sequence[float]], tol: float
    ) -> float:
        """Max |engine - expected| logprob over the probe sequences; raises past ``tol``."""
        got = self.prompt_logprobs(sequences)
        return probe_diff(self.engine_id, self.version, got, expected, tol)
