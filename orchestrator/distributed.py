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
from pathlib import Path
from typing import Any

from inference_server.actors import start_engines
from inference_server.protocol import GenerateRequest, GenerateResult, SamplingParams
from inference_server.router import EngineRouter
from orchestrator import checkpoint
from orchestrator.config import RunConfig
from orchestrator.data import Prompt, PromptSampler, read_jsonl
from orchestrator.evaluate import EvalResult
from orchestrator.loop import RunSummary, build_batch, describe, evaluate_heldout, tokenize
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


def drop_stale(r: Rollout, version: int, bound: int) -> tuple[Rollout, int]:
    """Remove groups any of whose completions came from weights older than the bound."""
    keep = [
        i
        for i, res in enumerate(r.results)
        if all(version - c.policy_version <= bound for c in res.completions)
    ]
    dropped = len(r.results) - len(keep)
    return (
        Rollout(
            [r.prompts[i] for i in keep],
            [r.requests[i] for i in keep],
            [r.results[i] for i in keep],
            [r.scores[i] for i in keep],
            r.seconds,
        ),
        dropped,
    )


def run_distributed(cfg: RunConfig, model: Any, tok: Any, log: Any = print) -> RunSummary:
    """Evaluate, train ``cfg.steps`` steps on the cluster, evaluate again; ``cfg.resume``
    continues from the latest checkpoint with no prompt skipped or repeated."""
    out_dir = Path(cfg.output_dir)
    cluster = Cluster(cfg, model, tok)
    heldout = read_jsonl(cfg.eval.heldout)[: cfg.eval.num_prompts]
    sampler = PromptSampler(cfg.datasets, cfg.seed)
    start, version = 0, 0
    ckpt = checkpoint.latest(out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
    if ckpt is not None:
        saved = json.loads((ckpt / "driver.json").read_text())
        start, version = saved["step"], cluster.trainers.load(ckpt / "trainer.pt")
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
    cache: dict[str, list[int]] = {}
    bound = cfg.rollout.max_staleness
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
            ready = pending.result()
            inflight: list[Prompt] = []
            if bound > 0 and step + 1 < cfg.steps:  # next rollout overlaps this step's training
                inflight = sampler.sample(n)
                pending = pool.submit(rollout, cluster, inflight, tok, cache)
            ready, stale = drop_stale(ready, version, bound)
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
            every = cfg.checkpoint.every_steps
            if (every and (step + 1) % every == 0) or requests.take():
                driver = {
                    "version": version,
                    "sampler": sampler.state(),
                    "inflight": [p.id for p in inflight],
                    "before": before.to_dict(),
                }
                path = checkpoint.save(
                    out_dir, step + 1, driver, cluster.trainers, cfg.checkpoint.keep
                )
                log(f"checkpoint {path}")
            if bound == 0 and step + 1 < cfg.steps:
                pending = pool.submit(rollout, cluster, sampler.sample(n), tok, cache)
            metrics.update(ready.seconds)
            metrics.update(
                step=float(step),
                version=float(version),
                groups_stale_dropped=float(stale),
                staleness_max=float(max(staleness, default=0)),
                step_seconds=time.perf_counter() - t0,
            )
            history.append(metrics)
            for key, value in metrics.items():
                board.add_scalar(key, value, step)
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
    cluster.close()
    return RunSummary(before=before, after=after, history=history)
