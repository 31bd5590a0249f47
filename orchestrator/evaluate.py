"""Held-out evaluation: greedy accuracy, sampled pass@1 and pass@k.

A run evaluates on its own engines and env pools (``evaluate_sets``): every
``[[eval.sets]]`` entry (``load_sets``: a file scored by one of the run's envs) at the
start, every ``eval.every_steps`` steps and at the end, each group scored as soon as the
engines hand it over. The driver never holds the model's weights for it.

``evaluate_passk`` is the offline counterpart for a model in this process (the tiny
model's build script, ``examples/tiny_arith/measure_passk.py``, the TRL bench): it samples
through the transformers engine and scores with ``score_batch(items) -> [score or None]``,
seeded, without disturbing the caller's global torch RNG.

Both count a completion as correct when its score is >= 0.5 (``tally``); one the env could
not score (None) is counted in ``errors``, not as a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.tokens import encode_prompts
from inference_server.transformers_backend import TransformersEngine
from orchestrator.config import ConfigError, EvalSet, RunConfig
from orchestrator.data import Prompt, check_fields, read_jsonl, required_fields
from orchestrator.rollout import Generator, generate_scored, sampling_params, tokenize
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

    def scores(outs: list[list[str]]) -> list[list[float | None]]:
        items = [
            Item(r["prompt"], c, {k: v for k, v in r.items() if k not in ("id", "prompt", "env")})
            for r, o in zip(rows, outs, strict=True)
            for c in o
        ]
        flat = iter(score_batch(items))
        return [[next(flat) for _ in o] for o in outs]

    greedy_scores = None
    if greedy:
        greedy_scores = scores(
            texts(SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens))
        )
    device = next(model.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        sampled = texts(SamplingParams(n=k, temperature=temperature, max_tokens=max_new_tokens))
    return tally(scores(sampled), greedy_scores)


@dataclass(frozen=True)
class HeldOut:
    """One ``[[eval.sets]]`` entry with its prompts, each tagged with the set's env."""

    spec: EvalSet
    prompts: list[Prompt]


def load_sets(cfg: RunConfig) -> list[HeldOut]:
    """The run's held-out sets (``eval.resolved()``) read and checked: each prompt is
    scored by its set's env, which must be one of the run's envs; a row naming another env,
    or (for the single ``eval.heldout`` set) no env at all, is an error, and so is a row
    lacking a field its env needs."""
    names = [e.name for e in cfg.envs]
    sets = []
    for spec in cfg.eval.resolved():
        prompts = read_jsonl(spec.file)[: spec.n]
        where = f"eval set {spec.name!r} ({spec.file})"
        if not prompts:
            raise ConfigError(f"{where} has no rows")
        envs = {p.env for p in prompts if p.env}
        env = spec.env or (envs.pop() if len(envs) == 1 else "")
        if not env:
            raise ConfigError(
                f"{where}: its rows name no single env (env column: {sorted(envs) or 'none'}); "
                "set eval.env, or declare [[eval.sets]] with file and env"
            )
        other = sorted(e for e in envs if e != env)
        if other:
            raise ConfigError(
                f"{where} is scored by env {env!r}, but rows name env {other[0]!r}: split the "
                "file into one set per env"
            )
        if env not in names:
            raise ConfigError(
                f"{where} is scored by env {env!r}, which is not in envs {names}; declare "
                "[[eval.sets]] for this run's envs (file, env), or add the env"
            )
        needs = required_fields([e for e in cfg.envs if e.name == env]).get(env, ())
        check_fields(prompts, where, env, needs)
        spec = spec.model_copy(update={"env": env})
        sets.append(HeldOut(spec, [replace(p, env=env) for p in prompts]))
    return sets


def evaluate_sets(
    cfg: RunConfig,
    sets: list[HeldOut],
    engines: Generator,
    scorer: Scorer,
    tok: Any,
    cache: dict[str, dict[str, list[int]]],
) -> dict[str, EvalResult]:
    """Greedy accuracy, sampled pass@1 and pass@k of the weights the engines serve now, per
    set, scored by the env pools: one ``generate`` call for every set (greedy and sampled
    requests), each group scored as soon as it is back. The driver holds no weights.
    ``cache``: set name -> prompt id -> token ids (sets may share ids), filled as it goes."""
    sampled = sampling_params(cfg).model_copy(update={"seed": cfg.seed})  # repeatable
    prompts: list[Prompt] = []
    requests: list[GenerateRequest] = []
    for h in sets:
        k = h.spec.k or cfg.eval.k
        kinds = [("k", sampled.model_copy(update={"n": k}))]
        if h.spec.greedy:
            kinds.append(("greedy", sampled.model_copy(update={"n": 1, "temperature": 0.0})))
        for i, p in enumerate(h.prompts):
            ids = tokenize(tok, p, cache.setdefault(h.spec.name, {}), cfg.prompt)
            for kind, params in kinds:
                rid = f"eval/{h.spec.name}/{i}/{kind}"
                requests.append(GenerateRequest(request_id=rid, sampling=params, prompt_ids=ids))
                prompts.append(p)
    _, scores, _ = generate_scored(engines, scorer, prompts, requests)
    got = {r.request_id: [s.score for s in g] for r, g in zip(requests, scores, strict=True)}
    out = {}
    for h in sets:
        n = len(h.prompts)
        name = h.spec.name
        out[name] = tally(
            [got[f"eval/{name}/{i}/k"] for i in range(n)],
            [got[f"eval/{name}/{i}/greedy"] for i in range(n)] if h.spec.greedy else None,
        )
    return out


def tally(sampled: list[list[float | None]], greedy: list[list[float | None]] | None) -> EvalResult:
    """``EvalResult`` from the scores of each prompt's k samples (and greedy completion);
    a score >= 0.5 is a hit, None an error (neither right nor wrong)."""
    n, k = len(sampled), len(sampled[0])
    hits = [sum(s is not None and s >= 0.5 for s in row) for row in sampled]
    errors = sum(s is None for row in sampled for s in row)
    greedy_acc = float("nan")
    if greedy is not None:
        greedy_acc = sum(s is not None and s >= 0.5 for row in greedy for s in row) / n
        errors += sum(s is None for row in greedy for s in row)
    return EvalResult(
        greedy_acc=greedy_acc,
        pass1=sum(hits) / (n * k),
        passk=sum(h > 0 for h in hits) / n,
        n_prompts=n,
        k=k,
        errors=errors,
    )


def eval_metrics(results: dict[str, EvalResult]) -> dict[str, float]:
    """``eval/<set>/{greedy,pass1,passk,errors}``: what a step records when it evaluates."""
    return {
        f"eval/{name}/{key}": float(value)
        for name, r in results.items()
        for key, value in (
            ("greedy", r.greedy_acc),
            ("pass1", r.pass1),
            ("passk", r.passk),
            ("errors", r.errors),
        )
    }


def describe(name: str, r: EvalResult) -> str:
    """One log line of an evaluation."""
    return (
        f"{name}: greedy {r.greedy_acc:.3f}  pass@1 {r.pass1:.3f}  pass@{r.k} {r.passk:.3f}"
        f"  ({r.n_prompts} held-out prompts)"
    )
