"""Offline pass@k evaluation of a HF causal LM on verifiable prompts (greedy, pass@1, pass@k).

Owns :func:`evaluate_passk`, used by the CLI, the tiny model's build script and
``examples/tiny_arith/measure_passk.py``. It samples through the transformers engine
(``inference_server.transformers_backend``), the same path RL rollouts take. Prompts are
encoded by ``inference_server.tokens.encode_prompts`` (``<s>`` + prompt). Completions are
scored in one batch per pass by ``score_batch(items) -> [score or None]`` (an env pool in a
run; a plain function in the example scripts) and count as correct when the score is >= 0.5.
An item the env could not score (None) is counted in ``errors``, not as a wrong answer.
Sampling is seeded and does not disturb the caller's global torch RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.tokens import encode_prompts
from inference_server.transformers_backend import TransformersEngine
from orchestrator.config import RunConfig
from orchestrator.data import Prompt, check_fields, read_jsonl, required_fields
from orchestrator.scoring import Scorer
from reward_envs.protocol import Item

BatchScore = Callable[[list[Item]], list[float | None]]


def in_process(fn: Callable[..., float]) -> BatchScore:
    """A plain ``fn(prompt, completion, **fields)`` as a batch scorer (offline tooling only;
    runs score through env pools)."""
    return lambda items: [fn(i.prompt, i.completion, **i.fields) for i in items]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one evaluation run; ``pass1``/``passk`` use ``k`` samples per prompt."""

    greedy_acc: float  # fraction of prompts solved by greedy decoding
    pass1: float  # mean accuracy over all k samples (unbiased pass@1 estimate)
    passk: float  # fraction of prompts with >= 1 correct among k samples
    n_prompts: int
    k: int
    errors: int = 0  # completions the env could not score (neither right nor wrong)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluate_passk(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    score_batch: BatchScore,
    k: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    batch_size: int = 256,
    seed: int = 0,
    greedy: bool = True,
) -> EvalResult:
    """Greedy accuracy, sampled pass@1 and pass@k of ``model`` on ``rows``.

    ``rows`` need ``prompt`` and ``answer`` keys. ``batch_size`` bounds the number of sequences
    per ``generate`` call. ``greedy=False`` skips the greedy pass (``greedy_acc`` is then NaN).
    The model's train/eval mode is left as it was.
    """
    if not rows:
        raise ValueError("evaluate_passk needs at least one row")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    engine = TransformersEngine(model, tokenizer, batch_size=batch_size)
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])

    def texts(params: SamplingParams) -> list[list[str]]:
        requests = [
            GenerateRequest(request_id=str(i), prompt_ids=ids, sampling=params)
            for i, ids in enumerate(prompt_ids)
        ]
        return [[c.text for c in res.completions] for res in engine.generate(requests)]

    errors = 0

    def hits(outs: list[list[str]]) -> list[int]:
        nonlocal errors
        fields = [{k: v for k, v in r.items() if k not in ("id", "prompt", "env")} for r in rows]
        items = [
            Item(r["prompt"], c, f) for r, f, o in zip(rows, fields, outs, strict=True) for c in o
        ]
        scores = iter(score_batch(items))
        per_prompt = []
        for o in outs:
            got = [next(scores) for _ in o]
            errors += sum(s is None for s in got)
            per_prompt.append(sum(s is not None and s >= 0.5 for s in got))
        return per_prompt

    greedy_hits = 0
    if greedy:
        outs = texts(SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens))
        greedy_hits = sum(hits(outs))

    device = next(model.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        sampled = texts(SamplingParams(n=k, temperature=temperature, max_tokens=max_new_tokens))
    per_prompt = hits(sampled)
    sample_hits = sum(per_prompt)
    solved = sum(h > 0 for h in per_prompt)

    n = len(rows)
    return EvalResult(
        greedy_acc=greedy_hits / n if greedy else float("nan"),
        pass1=sample_hits / (n * k),
        passk=solved / n,
        n_prompts=n,
        k=k,
        errors=errors,
    )


def evaluate_heldout(cfg: RunConfig, model: Any, tok: Any, scorer: Scorer) -> EvalResult:
    """Greedy, sampled pass@1 and pass@k of ``model`` on the run's held-out prompts, scored
    by the env they belong to."""
    heldout = read_jsonl(cfg.eval.heldout)[: cfg.eval.num_prompts]
    by_env: dict[str, list[Prompt]] = {}
    for p in heldout:
        by_env.setdefault(p.env or cfg.datasets[0].env, []).append(p)
    if len(by_env) != 1:
        raise ValueError("held-out evaluation takes prompts of one env; split the file")
    env, prompts = next(iter(by_env.items()))
    needs = required_fields([e for e in cfg.envs if e.name == env]).get(env, ())
    check_fields(prompts, f"eval.heldout {cfg.eval.heldout}", env, needs)
    rows = [{"prompt": p.text, **p.fields} for p in prompts]
    return evaluate_passk(
        model,
        tok,
        rows,
        lambda items: [r.score for r in scorer.score(env, items)],
        k=cfg.eval.k,
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.seed,
    )


def describe(name: str, r: EvalResult) -> str:
    """One log line of an evaluation."""
    return (
        f"{name}: greedy {r.greedy_acc:.3f}  pass@1 {r.pass1:.3f}  pass@{r.k} {r.passk:.3f}"
        f"  ({r.n_prompts} held-out prompts)"
    )
