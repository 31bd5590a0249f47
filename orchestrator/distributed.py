"""The RL loop on a Ray cluster: engines on inference nodes, trainer ranks and env pools on
trainer nodes, this driver on the head.

    sample prompts -> engines generate (router) -> env pools score -> advantages
    -> trainer group step -> weights (v+1) to every engine, checked by the probe

With ``rollout.max_staleness = k > 0`` the rollouts of step s+1 are generated while
step s trains (one rollout in flight); samples from weights more than k versions
behind the trainer are dropped and counted. ``k = 0`` is synchronous and on-policy.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from inference_server.actors import start_engines
from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.router import EngineRouter
from inference_server.tokens import encode_prompts
from orchestrator import checkpoint
from orchestrator.config import RunConfig
from orchestrator.data import Prefetcher, Prompt, PromptSampler, read_jsonl
from orchestrator.evaluate import EvalResult
from orchestrator.live import LiveEnvs
from orchestrator.loop import RunSummary, build_batch, describe, evaluate_heldout, tokenize
from orchestrator.monitor import RunMetrics, start_gpu_monitors
from orchestrator.prepare import PreparedStore
from orchestrator.scoring import score_groups
from reward_envs.protocol import RewardResult
from reward_envs.scorer import RayScorer
from trainer.group import TrainerGroup


@dataclass
class Rollout:
    """One step's prompts, what the engines made of them and what the envs said."""

    prompts: list[Prompt]
    requests: list[GenerateRequest]
    results: list[GenerateResult]
    scores: list[list[RewardResult]]
    seconds: dict[str, float]


class Cluster:
    """The run's actors: engines + router, trainer group, env pools."""

    def __init__(self, cfg: RunConfig, model: Any, tok: Any) -> None:
        from inference_server.weights import served_shapes

        self.cfg = cfg
        self.names = sorted(served_shapes(cfg.model))
        self.trainers = TrainerGroup(cfg.model, cfg.trainer)
        backend = cfg.inference.backend
        self.engines = start_engines(backend, cfg.model, cfg.trainer.dtype, cfg.seed)
        self.router = EngineRouter(self.engines)
        self.envs = RayScorer(cfg.envs, log_dir=Path(cfg.output_dir) / "envs")
        heldout = read_jsonl(cfg.eval.heldout)
        cache: dict[str, list[int]] = {}
        n_probe = getattr(backend, "probe_sequences", 4)
        self.probe = [tokenize(tok, p, cache) for p in heldout[:n_probe]]
        self.probe_tol = getattr(backend, "probe_tolerance", 1e-3)
        self.gpu_monitors = start_gpu_monitors()

    def push(self, version: int) -> dict[str, float]:
        """Rank 0's weights to every engine through the object store, then the probe."""
        t0 = time.perf_counter()
        metrics = self.router.update_weights(version, self.trainers.host_state(self.names))
        expected = self.trainers.logprobs(self.probe)
        metrics["weight_sync/probe_max_diff"] = self.router.probe(
            self.probe, expected, self.probe_tol
        )
        metrics["seconds/sync"] = time.perf_counter() - t0
        return metrics

    def close(self) -> None:
        import ray

        for m in self.gpu_monitors:
            ray.kill(m)
        self.envs.close()


def rollout(
    cluster: Cluster, prompts: list[Prompt], tok: Any, cache: dict[str, list[int]]
) -> Rollout:
    cfg = cluster.cfg
    sampling = SamplingParams(
        n=cfg.rollout.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_new_tokens,
    )
    requests = [
        GenerateRequest(request_id=p.id, sampling=sampling, prompt_ids=tokenize(tok, p, cache))
        for p in prompts
    ]
    t0 = time.perf_counter()
    results = cluster.router.generate(requests)
    t1 = time.perf_counter()
    scores = score_groups(cluster.envs, prompts, results)
    seconds = {"seconds/generate": t1 - t0, "seconds/score": time.perf_counter() - t1}
    return Rollout(prompts, requests, results, scores, seconds)


def progress_bar() -> Any:
    """A rich progress bar (step, reward, tokens/s, ETA) on a terminal; off otherwise, where
    the loop prints a line every 10 steps instead."""
    import sys

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not sys.stdout.isatty(),
    )


def select(r: Rollout, keep: list[int]) -> Rollout:
    """The groups of ``r`` at indices ``keep``."""
    return Rollout(
        [r.prompts[i] for i in keep],
        [r.requests[i] for i in keep],
        [r.results[i] for i in keep],
        [r.scores[i] for i in keep],
        r.seconds,
    )


def merge(a: Rollout, b: Rollout) -> Rollout:
    """One rollout holding the groups of both (a refill round joins the step's rollout)."""
    seconds = {k: a.seconds.get(k, 0.0) + b.seconds.get(k, 0.0) for k in a.seconds | b.seconds}
    return Rollout(
        a.prompts + b.prompts,
        a.requests + b.requests,
        a.results + b.results,
        a.scores + b.scores,
        seconds,
    )


def handle_stale(r: Rollout, version: int, bound: int, how: str) -> tuple[Rollout, int]:
    """Groups any of whose completions came from weights more than ``bound`` versions behind
    ``version``: removed (``how="drop"``) or kept for the loss's TIS correction (``"tis"``).
    Returns the rollout to train on and how many groups were stale."""
    stale = [
        i
        for i, res in enumerate(r.results)
        if any(version - c.policy_version > bound for c in res.completions)
    ]
    if how == "tis" or not stale:
        return r, len(stale)
    fresh = [i for i in range(len(r.results)) if i not in set(stale)]
    return select(r, fresh), len(stale)


def teaching_groups(r: Rollout, cfg: RunConfig) -> int:
    """Groups ``build_batch`` will train on: every completion scored, and (when zero-variance
    groups are dropped) not all rewards equal (``trainer.advantages``' own test)."""
    import torch

    from trainer.advantages import zero_variance_groups

    scored = [[s.score for s in g] for g in r.scores if all(s.score is not None for s in g)]
    if not scored or not cfg.advantage.drop_zero_variance:
        return len(scored)
    return len(scored) - int(zero_variance_groups(torch.tensor(scored)).sum())


def run_distributed(cfg: RunConfig, model: Any, tok: Any, log: Any = print) -> RunSummary:
    """Evaluate, train ``cfg.steps`` steps on the cluster, evaluate again; ``cfg.resume``
    continues from the latest checkpoint with no prompt skipped or repeated."""
    cluster = Cluster(cfg, model, tok)
    api: LiveEnvs | None = None
    sampler: Prefetcher | None = None
    try:
        from transformers import AutoTokenizer

        store = PreparedStore.for_run(cfg, log)
        sampler = Prefetcher(  # draws and tokenizes the next steps' prompts ahead
            PromptSampler(cfg.datasets, cfg.seed, store=store),
            batch_size=cfg.rollout.prompts_per_step,
            encode=partial(encode_prompts, AutoTokenizer.from_pretrained(cfg.model)),
        )
        if cfg.env_api.enabled:
            api = LiveEnvs(cfg, cluster.envs, sampler, log)
        return _train(cfg, model, tok, cluster, sampler, api, log)
    finally:
        if api is not None:
            api.close()
        if sampler is not None:
            sampler.close()
        cluster.close()


def _train(
    cfg: RunConfig,
    model: Any,
    tok: Any,
    cluster: Cluster,
    sampler: Prefetcher,
    api: LiveEnvs | None,
    log: Any,
) -> RunSummary:
    out_dir = Path(cfg.output_dir)
    heldout = read_jsonl(cfg.eval.heldout)[: cfg.eval.num_prompts]
    start, version = 0, 0
    ckpt = checkpoint.latest(out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
    if ckpt is not None:
        saved = json.loads((ckpt / "driver.json").read_text())
        start, version = saved["step"], cluster.trainers.load(ckpt / "trainer.pt")
        if api is not None:
            api.restore(saved.get("live_envs", {}))
        sampler.restore(saved["sampler"], saved["inflight"])
        before = EvalResult(**saved["before"])
        if version > 0:
            cluster.push(version)  # the engines start from the checkpoint's weights
        for name in ("metrics.jsonl", "prompts.jsonl"):  # drop steps after the checkpoint
            lines = (out_dir / name).read_text().splitlines()[:start]
            (out_dir / name).write_text("".join(x + "\n" for x in lines))
        log(f"resumed from {ckpt} at step {start} (version {version})")
    else:
        before = evaluate_heldout(cfg, model, tok, heldout, cluster.envs)
        for name in ("metrics.jsonl", "prompts.jsonl"):
            (out_dir / name).write_text("")
    log(describe("before", before))
    requests = checkpoint.Requests(out_dir)
    from torch.utils.tensorboard import SummaryWriter

    board = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start)
    exported = RunMetrics(out_dir.name)  # the same metrics, on the Ray dashboard / Prometheus
    cache: dict[str, list[int]] = {}
    bound = cfg.rollout.max_staleness
    stale_key = "groups_stale_corrected" if cfg.rollout.stale == "tis" else "groups_stale_dropped"
    history: list[dict[str, float]] = []
    n = cfg.rollout.prompts_per_step
    bar = progress_bar()
    task = bar.add_task("train", total=cfg.steps, completed=start, info="")
    with (
        ThreadPoolExecutor(1) as pool,
        open(out_dir / "metrics.jsonl", "a") as metrics_file,
        open(out_dir / "prompts.jsonl", "a") as prompts_file,
        bar,
    ):
        drawn = sampler.sample(n)
        pending: Future[Rollout] = pool.submit(rollout, cluster, drawn, tok, cache)
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            ready, stale = handle_stale(pending.result(), version, bound, cfg.rollout.stale)
            joins = api.sync(step) if api is not None else {}  # nothing is in flight here
            refills, refill_prompts = 0, 0
            while refills < cfg.advantage.refill_rounds:  # dynamic sampling: top up the step
                missing = n - teaching_groups(ready, cfg)
                if missing <= 0:
                    break
                ready = merge(ready, rollout(cluster, sampler.sample(missing), tok, cache))
                refills, refill_prompts = refills + 1, refill_prompts + missing
            inflight: list[Prompt] = []
            if bound > 0 and step + 1 < cfg.steps:  # next rollout overlaps this step's training
                inflight = sampler.sample(n)
                pending = pool.submit(rollout, cluster, inflight, tok, cache)
            staleness = [version - c.policy_version for r in ready.results for c in r.completions]
            batch, metrics = build_batch(
                step, ready.prompts, ready.requests, ready.results, ready.scores, cfg
            )
            t1 = time.perf_counter()
            if batch is not None:
                metrics.update(cluster.trainers.train_step(batch))
                version += 1
            metrics["seconds/train"] = time.perf_counter() - t1
            metrics.update(cluster.push(version))
            metrics.update(cluster.router.metrics())  # engines alive/dead, requests re-queued
            metrics.update(cluster.envs.metrics())  # per env: restarts, errors, replicas lost
            every = cfg.checkpoint.every_steps
            if (every and (step + 1) % every == 0) or requests.take():
                driver = {
                    "version": version,
                    "sampler": sampler.state(),
                    "inflight": [p.id for p in inflight],
                    "live_envs": api.state() if api is not None else {},
                    "before": before.to_dict(),
                }
                path = checkpoint.save(
                    out_dir, step + 1, driver, cluster.trainers, cfg.checkpoint.keep
                )
                log(f"checkpoint {path}")
            if bound == 0 and step + 1 < cfg.steps:
                pending = pool.submit(rollout, cluster, sampler.sample(n), tok, cache)
            metrics.update(ready.seconds)
            metrics.update(joins)
            metrics.update(
                step=float(step),
                version=float(version),
                staleness_max=float(max(staleness, default=0)),
                refill_rounds=float(refills),
                refill_prompts=float(refill_prompts),
                **{f"staleness/{k}": float(staleness.count(k)) for k in sorted(set(staleness))},
                **{stale_key: float(stale)},
                step_seconds=time.perf_counter() - t0,
            )
            history.append(metrics)
            for key, value in metrics.items():
                board.add_scalar(key, value, step)
            exported.record(metrics)
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            prompts_file.write(json.dumps({"step": step, "prompts": [p.id for p in ready.prompts]}))
            prompts_file.write("\n")
            prompts_file.flush()
            bar.update(
                task,
                advance=1,
                info=f"reward {metrics['reward_mean']:.3f}  "
                f"{metrics.get('tokens_per_s', 0.0):,.0f} train tok/s  "
                f"{metrics['step_seconds']:.2f} s/step",
            )
            if bar.disable and (step % 10 == 0 or step == cfg.steps - 1):
                log(
                    f"step {step:4d}  reward {metrics['reward_mean']:.3f}  "
                    f"groups kept {int(metrics['groups_kept'])}/{n}  "
                    f"{metrics['step_seconds']:.2f} s/step"
                )
    import ray

    trained = ray.get(cluster.trainers.host_state(list(model.state_dict()))).tensors()
    model.load_state_dict(trained)
    after = evaluate_heldout(cfg, model, tok, heldout, cluster.envs)
    log(describe("after ", after))
    board.close()
    return RunSummary(before=before, after=after, history=history)
