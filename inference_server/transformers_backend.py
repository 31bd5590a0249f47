"""HF ``generate`` backend: batched sampling with per-token logprobs, in the caller's process.

For tiny models it beats vLLM on CPU (DESIGN.md: break-even near 20M
parameters), and it lets a single-process run share one model object between
generation and training, so there is no weight transfer at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from inference_server.protocol import Completion, GenerateRequest, GenerateResult, SamplingParams


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

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Sample ``sampling.n`` completions for every request (same params per call)."""
        if not requests:
            return []
        params = requests[0].sampling
        if any(r.sampling != params for r in requests):
            raise ValueError("one generate() call takes one SamplingParams; split the requests")
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
        if p.stop:
            sampling.update(stop_strings=p.stop, tokenizer=self.tokenizer)
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
        for row, lp in zip(new.tolist(), logps.tolist(), strict=True):
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            while end > 0 and row[end - 1] == self.pad_id and self.pad_id != self.eos_id:
                end -= 1  # padding after a stop string ended this row early
            reason = "stop" if end < p.max_tokens or row[end - 1] == self.eos_id else "length"
            tokens = row[:end]
            result.append(
                Completion(
                    token_ids=tokens,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    logprobs=lp[:end],
                    finish_reason=reason,
                    policy_version=self.version,
                    engine_id=self.engine_id,
                )
            )
        return result
