"""The RL driver loop, single process: sample -> generate -> score -> advantages -> train.

Generation and training share one model object here, so "pushing weights" is
just bumping the engine's version. The distributed loop (Ray engines, trainer
group, env pools, async staleness) keeps exactly this shape.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.tokens import encode_prompts
from inference_server.transformers_backend import TransformersEngine
from orchestrator.config import RunConfig
from orchestrator.data import Prompt, PromptSampler, read_jsonl
from orchestrator.evaluate import EvalResult, evaluate_passk
from orchestrator.prepare import PreparedStore
from orchestrator.report import write_report
from orchestrator.scoring import Scorer, score_groups
from reward_envs.protocol import RewardResult
from reward_envs.scorer import LocalScorer
from trainer.advantages import compute_advantages
from trainer.logprobs import sequence_logprobs
from trainer.protocol import TrainBatch, TrainSample
from trainer.trainer import Trainer

Engine = Any  # TransformersEngine | VLLMEngine: same generate() contract


@dataclass
class RunSummary:
    before: EvalResult
    after: EvalResult
    history: list[dict[str, float]]


def load_policy(cfg: RunConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cfg.model / "config.json").exists():
        raise FileNotFoundError(
            f"model dir {cfg.model} has no config.json; point `model` at a "
            "HF-format directory (hub ids are not supported offline)"
        )
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model,
        dtype=getattr(torch, cfg.trainer.dtype),
        attn_implementation=cfg.trainer.attn_implementation,
    )
    return model, tok


def build_batch(
    step: int,
    prompts: list[Prompt],
    requests: list[GenerateRequest],
    results: list[GenerateResult],
    scores: list[list[RewardResult]],
    cfg: RunConfig,
) -> tuple[TrainBatch | None, dict[str, float]]:
    """Group advantages from the scored completions; keep the groups that teach."""
    samples: list[TrainSample] = []
    rewards, errors, kept, zero_var = [], 0, 0, 0
    by_kind: Counter[str] = Counter()
    for prompt, request, result, group in zip(prompts, requests, results, scores, strict=True):
        if any(s.score is None for s in group):
            for s in group:  # group unusable: every error counted by kind, nothing zeroed
                if s.score is None:
                    errors += 1
                    by_kind[f"reward_errors/{s.env}/{s.error_kind}"] += 1
            continue
        r = torch.tensor([[s.score for s in group]], dtype=torch.float32)
        rewards.extend(r[0].tolist())
        adv = compute_advantages(r, cfg.advantage.type, cfg.advantage.scale_by_std)
        if bool(adv.zero_variance[0]):
            zero_var += 1
            if cfg.advantage.drop_zero_variance:
                continue
        kept += 1
        for i, (c, s) in enumerate(zip(result.completions, group, strict=True)):
            if c.token_ids:
                samples.append(
                    TrainSample(
                        sample_id=f"{prompt.id}/{i}",
                        prompt_ids=request.prompt_ids,
                        completion_ids=c.token_ids,
                        advantage=float(adv.values[0, i]),
                        engine_logprobs=c.logprobs,
                        policy_version=c.policy_version,
                        engine_id=c.engine_id,
                        env=s.env,
                        env_build=s.build_hash,
                    )
                )
    lengths = [len(c.token_ids) for r in results for c in r.completions]
    by_env: dict[str, list[float]] = {}
    for prompt, group in zip(prompts, scores, strict=True):
        by_env.setdefault(prompt.env, []).extend(s.score for s in group if s.score is not None)
    stats = {
        "response_len_mean": sum(lengths) / max(1, len(lengths)),
        "response_len_max": float(max(lengths, default=0)),
        "truncation_rate": sum(c.finish_reason == "length" for r in results for c in r.completions)
        / max(1, len(lengths)),
        **{f"reward_mean/{env}": sum(v) / len(v) for env, v in by_env.items() if v},
        "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
        "groups_kept": float(kept),
        "groups_zero_variance": float(zero_var),
        "reward_errors": float(errors),
        **{k: float(v) for k, v in by_kind.items()},
    }
    if not samples:
        return None, stats
    return TrainBatch(
        step=step, samples=samples, max_completion_length=cfg.rollout.max_new_tokens
    ), stats


class Policy:
    """The model, its tokenizer, the engine sampling from it and the env scorers."""

    def __init__(self, cfg: RunConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model, self.tok = load_policy(cfg)
        self.envs = LocalScorer(cfg.envs, log_dir=Path(cfg.output_dir) / "envs")
        self.heldout = read_jsonl(cfg.eval.heldout)[: cfg.eval.num_prompts]
        backend = cfg.inference.backend
        self.engine: Engine
        if backend.type == "transformers":
            self.engine = TransformersEngine(self.model, self.tok, batch_size=backend.batch_size)
        else:
            from inference_server.vllm_backend import VLLMEngine

            self.engine = VLLMEngine(
                cfg.model,
                dtype=cfg.trainer.dtype,
                seed=cfg.seed,
                tensor_parallel_size=backend.tensor_parallel_size,
                gpu_memory_utilization=backend.gpu_memory_utilization,
                cpu_kvcache_gib=backend.cpu_kvcache_gib,
                inflight_on_update=backend.inflight_on_update,
                compile=backend.compile,
            )
            cache: dict[str, list[int]] = {}
            self.probe = [
                tokenize(self.tok, p, cache) for p in self.heldout[: backend.probe_sequences]
            ]

    def close(self) -> None:
        """Stop env workers and engine processes (vLLM) now, not at interpreter exit."""
        self.envs.close()
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def push(self, version: int) -> dict[str, float]:
        """Give the engine the trainer's weights as ``version`` and verify them."""
        from inference_server.vllm_backend import VLLMEngine

        if not isinstance(self.engine, VLLMEngine):
            self.engine.version = version  # shared model object: nothing to send
            return {}
        backend = self.cfg.inference.backend
        assert backend.type == "vllm"
        state = {k: v for k, v in self.model.state_dict().items() if k in self.engine.shapes}
        metrics = self.engine.update_weights(version, state, backend.bucket_mb << 20)
        expected = sequence_logprobs(self.model, self.probe, self.cfg.trainer.logprob_chunk_size)
        metrics["weight_sync/probe_max_diff"] = self.engine.probe(
            self.probe, expected, backend.probe_tolerance
        )
        return metrics

    def evaluate(self) -> EvalResult:
        """Greedy, sampled pass@1 and pass@k on the held-out prompts."""
        return evaluate_heldout(self.cfg, self.model, self.tok, self.heldout, self.envs)


def evaluate_heldout(
    cfg: RunConfig, model: Any, tok: Any, heldout: list[Prompt], scorer: Scorer
) -> EvalResult:
    """Greedy, sampled pass@1 and pass@k of ``model`` on the held-out prompts."""
    by_env: dict[str, list[Prompt]] = {}
    for p in heldout:
        by_env.setdefault(p.env or cfg.datasets[0].env, []).append(p)
    if len(by_env) != 1:
        raise ValueError("held-out evaluation takes prompts of one env; split the file")
    env, prompts = next(iter(by_env.items()))
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
    return (
        f"{name}: greedy {r.greedy_acc:.3f}  pass@1 {r.pass1:.3f}  pass@{r.k} {r.passk:.3f}"
        f"  ({r.n_prompts} held-out prompts)"
    )


def evaluate_only(cfg: RunConfig, log: Any = print) -> EvalResult:
    policy = Policy(cfg)
    result = policy.evaluate()
    policy.close()
    log(describe("eval", result))
    return result


def run(cfg: RunConfig, log: Any = print) -> RunSummary:
    """Evaluate, train ``cfg.steps`` GRPO steps, evaluate again: on a Ray cluster
    (``cluster.mode = "ray"``, the default) or in this one process."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if cfg.cluster.mode == "ray":
        summary = _run_on_ray(cfg, log)
    else:
        summary = _run_local(cfg, log)
    write_report(out_dir, summary.before, summary.after, summary.history)
    return summary


def _run_local(cfg: RunConfig, log: Any) -> RunSummary:
    out_dir = Path(cfg.output_dir)
    policy = Policy(cfg)
    trainer = Trainer(policy.model, cfg.trainer, pad_id=policy.tok.pad_token_id)
    sampler = PromptSampler(cfg.datasets, cfg.seed, store=PreparedStore.for_run(cfg, log))
    sampling = SamplingParams(
        n=cfg.rollout.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_new_tokens,
    )
    before = policy.evaluate()
    log(describe("before", before))
    history: list[dict[str, float]] = []
    token_cache: dict[str, list[int]] = {}
    with open(out_dir / "metrics.jsonl", "w") as metrics_file:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            prompts = sampler.sample(cfg.rollout.prompts_per_step)
            requests = [
                GenerateRequest(
                    request_id=p.id,
                    sampling=sampling,
                    prompt_ids=tokenize(policy.tok, p, token_cache),
                )
                for p in prompts
            ]
            results = policy.engine.generate(requests)
            scores = score_groups(policy.envs, prompts, results)
            batch, metrics = build_batch(step, prompts, requests, results, scores, cfg)
            if batch is not None:
                metrics.update(trainer.train_step(batch))
            metrics.update(policy.push(trainer.version))
            metrics.update(policy.envs.metrics())
            metrics.update(step=float(step), step_seconds=time.perf_counter() - t0)
            history.append(metrics)
            metrics_file.write(json.dumps(metrics) + "\n")
            if step % 10 == 0 or step == cfg.steps - 1:
                log(
                    f"step {step:4d}  reward {metrics['reward_mean']:.3f}  "
                    f"groups kept {int(metrics['groups_kept'])}/{len(prompts)}  "
                    f"{metrics['step_seconds']:.2f} s/step"
                )
    after = policy.evaluate()
    log(describe("after ", after))
    policy.close()
    return RunSummary(before=before, after=after, history=history)


def _run_on_ray(cfg: RunConfig, log: Any) -> RunSummary:
    import ray

    from orchestrator.cluster import connect, start_local
    from orchestrator.distributed import run_distributed

    c = cfg.cluster
    model, tok = load_policy(cfg)  # the driver's copy: held-out evaluation and probe inputs
    if c.address:
        if c.token_path is None:
            raise ValueError("cluster.address needs cluster.token_path (the cluster's token)")
        connect(c.address, c.token_path)
    else:
        start_local(
            Path(cfg.output_dir),
            num_cpus=c.num_cpus or 4 * (os.cpu_count() or 1),
            resources={"inference_node": 1, "trainer_node": 1},
            allow_network=c.allow_network,
        )
    try:
        return run_distributed(cfg, model, tok, log)
    finally:
        ray.shutdown()


def tokenize(tok: Any, p: Prompt, cache: dict[str, list[int]]) -> list[int]:
    """``<s>`` + prompt token ids: prepared ahead (``caravela data prepare``, or the
    prefetcher), else tokenized once per prompt per run."""
    if p.prompt_ids is not None:
        return list(p.prompt_ids)
    if p.id not in cache:
        (cache[p.id],) = encode_prompts(tok, [p.text])
    return cache[p.id]
