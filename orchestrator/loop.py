"""The RL loop: one loop, in one process or on a Ray cluster.

    sample prompts -> engines generate -> env pools score -> advantages
    -> trainer group step -> weights (v+1) to every engine, checked by the probe -> record

``train`` is the algorithm, one step per iteration; ``run`` sets it up (parts, prompt
stream, live envs, a fresh start or a resume) and evaluates before and after.
``cluster.mode`` only changes which parts ``orchestrator.parts.open_parts`` hands over.

With ``rollout.max_staleness = k > 0`` the rollout of step s+1 is generated while step s
trains; groups from weights more than k versions behind are dropped or TIS-corrected
(``rollout.stale``). ``k = 0`` is synchronous and on-policy. A step in which no group
teaches (all rewards equal, or every group errored) trains nothing, pushes nothing and is
counted in ``steps_without_batch``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from inference_server.tokens import check_prompt_format
from orchestrator import checkpoint, rundir
from orchestrator.config import RunConfig
from orchestrator.data import context_limit, required_fields
from orchestrator.evaluate import (
    EvalResult,
    HeldOut,
    describe,
    eval_metrics,
    evaluate_sets,
    load_sets,
)
from orchestrator.export import FINAL, export_run, load_policy, load_tokenizer, served_model
from orchestrator.live import LiveEnvs
from orchestrator.pairs import offline_rollout
from orchestrator.parts import Parts, open_parts
from orchestrator.prepare import PreparedStore
from orchestrator.protocol import DriverState, SamplerState
from orchestrator.record import Recorder
from orchestrator.report import write_report
from orchestrator.rollout import (
    Rollout,
    build_batch,
    handle_stale,
    refill,
    rollout,
    sampling_params,
    staleness,
)
from orchestrator.sampler import Prefetcher, PromptSampler
from trainer.group import TrainerDied

Log = Any  # Callable[[str], Any]


@dataclass
class RunSummary:
    before: EvalResult
    """The first held-out set's evaluation at the start (``before_sets[first]``)."""
    after: EvalResult
    history: list[dict[str, float]]
    before_sets: dict[str, EvalResult] = field(default_factory=dict)
    after_sets: dict[str, EvalResult] = field(default_factory=dict)


class Evaluator:
    """The run's held-out sets, evaluated on its engines and env pools (``evaluate_sets``)
    with prompt ids tokenized once."""

    def __init__(
        self, cfg: RunConfig, sets: list[HeldOut], parts: Parts, tok: Any, log: Log
    ) -> None:
        self.cfg, self.sets, self.parts, self.tok, self.log = cfg, sets, parts, tok, log
        self.cache: dict[str, dict[str, list[int]]] = {}

    def __call__(self, when: str) -> dict[str, EvalResult]:
        results = evaluate_sets(
            self.cfg, self.sets, self.parts.engines, self.parts.scorer, self.tok, self.cache
        )
        for name, r in results.items():
            self.log(describe(f"{when} [{name}]", r))
        return results


def train(
    cfg: RunConfig,
    parts: Parts,
    sampler: Prefetcher,
    live: LiveEnvs | None,
    record: Recorder,
    state: DriverState,
    tok: Any,
    evaluate: Evaluator | None = None,
) -> None:
    """Steps ``state.step`` to ``cfg.steps - 1``, advancing ``state`` (step, version);
    every ``eval.every_steps`` steps the held-out sets are evaluated first (``evaluate``)."""
    n, bound = cfg.rollout.prompts_per_step, cfg.rollout.max_staleness
    sampling = sampling_params(cfg)
    draw = partial(
        rollout, parts.engines, parts.scorer, sampling, tok=tok, cache={}, prompt=cfg.prompt
    )
    if cfg.algorithm == "dpo" and cfg.dpo.mode == "offline":  # pairs read, not generated
        served = lambda: parts.version  # noqa: E731 - read at every draw
        draw = partial(offline_rollout, tok=tok, cache={}, prompt=cfg.prompt, version=served)
    asked = checkpoint.Requests(Path(cfg.output_dir))
    stale_key = "groups_stale_" + ("corrected" if cfg.rollout.stale == "tis" else "dropped")
    with ThreadPoolExecutor(1) as pool:
        pending: Future[Rollout] = pool.submit(draw, sampler.sample(n))
        for step in range(state.step, cfg.steps):
            t0 = time.perf_counter()
            # sample -> generate -> score: this step's rollout was started ahead
            ready, stale = handle_stale(pending.result(), state.version, bound, cfg.rollout.stale)
            metrics = live.sync(step) if live is not None else {}  # nothing is in flight now
            every_eval = cfg.eval.every_steps
            if evaluate is not None and every_eval and step and step % every_eval == 0:
                metrics |= eval_metrics(evaluate(f"step {step}"))  # weights of `step` steps
            metrics |= parts.scale(step, live.engine_requests if live else None, record.log)
            ready, refills = refill(ready, draw, sampler.sample, cfg)
            inflight = sampler.sample(n) if bound > 0 and step + 1 < cfg.steps else []
            if inflight:  # async: the next rollout is generated while this step trains
                pending = pool.submit(draw, inflight)
            # advantages -> train -> push
            batch, stats = build_batch(step, ready, cfg)
            metrics |= stats | refills | staleness(ready, state.version)
            t1 = time.perf_counter()
            if batch is None:  # no group teaches: nothing to train on, nothing to push
                state.steps_without_batch += 1
            else:
                metrics |= parts.trainers.train_step(batch)
                state.version += 1
                metrics["seconds/train"] = time.perf_counter() - t1
                metrics |= parts.push(state.version)
            quarantine(parts, sampler, record.log)  # envs whose items keep failing
            metrics |= parts.metrics() | sampler.metrics()  # faults, errors, prompts too long
            # checkpoint, next rollout, record
            state.step = step + 1
            every, asked_now = cfg.checkpoint.every_steps, asked.take()
            if (every and (step + 1) % every == 0) or step + 1 == cfg.steps or asked_now:
                save(cfg, parts, sampler, live, state, [p.id for p in inflight], record.log)
            if bound == 0 and step + 1 < cfg.steps:
                pending = pool.submit(draw, sampler.sample(n))
            metrics |= ready.seconds | {
                stale_key: float(stale),
                "steps_without_batch": float(state.steps_without_batch),
                "step": float(step),
                "version": float(state.version),
                "step_seconds": time.perf_counter() - t0,
            }
            record.step(step, ready.prompts, metrics, rollout=ready)


def survive(
    cfg: RunConfig,
    parts: Parts,
    sampler: Prefetcher,
    live: LiveEnvs | None,
    record: Recorder,
    state: DriverState,
    tok: Any,
    evaluate: Evaluator | None = None,
) -> DriverState:
    """``train``, forming the trainer ranks again whenever one dies (up to
    ``trainer.max_restarts`` times), each time from the last checkpoint; the final state."""
    while True:
        try:
            train(cfg, parts, sampler, live, record, state, tok, evaluate)
            return state
        except TrainerDied as e:
            state = restart_trainers(cfg, parts, sampler, record, state, e)


def restart_trainers(
    cfg: RunConfig,
    parts: Parts,
    sampler: Prefetcher,
    record: Recorder,
    state: DriverState,
    error: TrainerDied,
) -> DriverState:
    """A rank died: stop them all, form a new group, load the last checkpoint (none yet:
    the initial weights, step 0), replay the prompts after it as ``--resume`` does, and
    push the weights to the engines. The engines already serve later versions, and versions
    must increase: the trainer goes on numbering after theirs."""
    log, limit = record.log, cfg.trainer.max_restarts
    restarts = parts.trainers.restarts
    if restarts >= limit:
        raise RuntimeError(
            f"{error}; the trainer ranks were already formed again {restarts} times "
            f"(trainer.max_restarts = {limit}): raise it, or look at the ranks' logs in "
            f"Ray's session directory for why they die"
        ) from error
    log(f"{error}: forming the trainer group again ({restarts + 1} of {limit})")
    parts.trainers.restart()
    ckpt = checkpoint.latest(Path(cfg.output_dir))
    if ckpt is None:
        state = state.model_copy(update={"step": 0, "version": 0, "steps_without_batch": 0})
        state.inflight = []
    else:
        saved = checkpoint.load(ckpt)
        state = saved.model_copy(update={"before": state.before, "before_sets": state.before_sets})
        if parts.trainers.load(ckpt) != state.version:
            raise ValueError(f"{ckpt}: the trainer's version differs from driver.json's")
    sampler.restore(state.sampler.model_dump(), state.inflight)
    served = parts.version
    if served > state.version:  # number on after the engines' version
        state.version = served + 1
        parts.trainers.set_version(state.version)
    if parts.meta is not None:
        parts.connect(parts.bucket_bytes)  # the new rank 0 opens the push group
    if state.version != served:
        parts.push(state.version)
    record.rewind(state.step)
    log(
        f"trainer group formed again: from {ckpt or 'the initial weights'} at step "
        f"{state.step}, the engines serve version {state.version}"
    )
    return state


def quarantine(parts: Parts, sampler: Prefetcher, log: Log) -> None:
    """Stop drawing the prompts of envs the scorer quarantined (their items kept failing;
    ``envs.<env>.breaker_*``); none left to draw from ends the run."""
    drawn = sampler.envs()
    for env, why in parts.scorer.quarantined().items():
        if env in drawn:
            if drawn == {env}:
                raise RuntimeError(
                    f"{why}; every env of the run is now quarantined, nothing is left to "
                    f"train on: fix the envs (their logs are in <run>/envs/) and resume"
                )
            sampler.remove(env)
            drawn.discard(env)
            log(f"{why}: its prompts are no longer drawn")


def save(
    cfg: RunConfig,
    parts: Parts,
    sampler: Prefetcher,
    live: LiveEnvs | None,
    state: DriverState,
    inflight: list[str],
    log: Log,
) -> None:
    """A checkpoint of ``state`` (the next step), the prompt stream and the trainer."""
    state = state.model_copy(
        update={
            "sampler": SamplerState.model_validate(sampler.state()),
            "inflight": inflight,
            "live_envs": live.state() if live is not None else {},
        }
    )
    path = checkpoint.save(Path(cfg.output_dir), state, parts.trainers, cfg.checkpoint.keep)
    log(f"checkpoint {path}")


def start(
    cfg: RunConfig,
    parts: Parts,
    sampler: Prefetcher,
    live: LiveEnvs | None,
    evaluate: Evaluator,
    log: Log,
) -> DriverState:
    """A fresh start (evaluate first) or, with ``cfg.resume``, the latest checkpoint (if there
    is none yet, a fresh start again): the
    trainer's weights and optimizer, the envs that had joined, the prompt stream (prompts
    that were in flight come first), and the engines serving the checkpoint's weights."""
    ckpt = checkpoint.latest(Path(cfg.output_dir)) if cfg.resume else None
    if ckpt is None:  # a fresh start, or a resume before any checkpoint was written
        before = evaluate("before")
        sampled = SamplerState.model_validate(sampler.state())
        first = next(iter(before.values()))
        return DriverState(step=0, version=0, sampler=sampled, before=first, before_sets=before)
    state = checkpoint.load(ckpt)
    version = parts.trainers.load(ckpt)
    if version != state.version:
        raise ValueError(
            f"{ckpt}: the trainer is at version {version}, driver.json at {state.version}"
        )
    if live is not None:
        live.restore(state.live_envs)
    sampler.restore(state.sampler.model_dump(), state.inflight)
    if version > 0:
        parts.push(version)  # the engines start from the checkpoint's weights
    log(f"resumed from {ckpt} at step {state.step} (version {version})")
    return state


def prompt_stream(cfg: RunConfig, log: Log) -> Prefetcher:
    """The run's prompts, drawn and tokenized ahead in a background thread (with a tokenizer
    of its own: HF fast tokenizers must not be shared between threads). Prompts that leave
    no room for ``rollout.max_new_tokens`` in the model's context are never drawn."""
    from transformers import AutoTokenizer

    from inference_server.tokens import encode_prompts

    context = context_limit(cfg.model)
    return Prefetcher(
        PromptSampler(
            cfg.datasets,
            cfg.seed,
            store=PreparedStore.for_run(cfg, log),
            required=required_fields(cfg.envs),
            log=log,
        ),
        batch_size=cfg.rollout.prompts_per_step,
        encode=partial(
            encode_prompts,
            AutoTokenizer.from_pretrained(cfg.model),
            format=cfg.prompt.format,
            system=cfg.prompt.system,
        ),
        max_prompt_tokens=None if context is None else context - cfg.rollout.max_new_tokens,
    )


def concrete_backend(cfg: RunConfig, log: Log = print) -> RunConfig:
    """``cfg`` with ``inference.backend.type = "auto"`` resolved once, for this machine: vLLM
    where CUDA and vllm are importable, else transformers. Everything after it (engines,
    probe, the run's ``config.json``) sees the backend that runs. A SLURM job's config comes
    resolved from ``caravela slurm render`` (``orchestrator.launch``), unless it runs in an
    Apptainer image on GPU nodes: then its driver, on inference node 0, decides here."""
    from inference_server.actors import available

    backend = cfg.inference.backend
    if backend.type != "auto":
        return cfg
    cuda, vllm = available()
    picked = backend.resolve(cuda, vllm)
    log(f"inference.backend auto -> {picked.type} (CUDA {cuda}, vllm {vllm})")
    return cfg.model_copy(
        update={"inference": cfg.inference.model_copy(update={"backend": picked})}
    )


def run(cfg: RunConfig, log: Log = print, overwrite: bool = False) -> RunSummary:
    """Evaluate, train ``cfg.steps`` steps, evaluate again (``cfg.resume``: continue from
    the latest checkpoint with no prompt skipped or repeated). A directory holding a previous
    run is refused unless resumed, or ``overwrite``: then that run is deleted first
    (``orchestrator.rundir``). The last step is checkpointed and the trained model written
    to ``<output_dir>/final/`` (HF format)."""
    out_dir = Path(cfg.output_dir)
    reads = [cfg.model, *(s.file for s in cfg.eval.resolved()), *(d.path for d in cfg.datasets)]
    rundir.claim(out_dir, cfg.resume, overwrite, reads, log)
    cfg = concrete_backend(cfg, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    tok = load_tokenizer(cfg.model)  # the driver never loads the weights
    check_prompt_format(tok, cfg.prompt.format, cfg.model)  # before any engine starts
    sets = load_sets(cfg)  # so is a held-out set that no env of the run scores
    with ExitStack() as stack:
        parts = stack.enter_context(open_parts(cfg, tok, log))
        sampler = stack.enter_context(prompt_stream(cfg, log))
        live = None
        if cfg.env_api.enabled:
            live = LiveEnvs(cfg, parts.scorer, sampler, log)
            stack.callback(live.close)
        evaluate = Evaluator(cfg, sets, parts, tok, log)
        state = start(cfg, parts, sampler, live, evaluate, log)
        if not state.before_sets:  # a checkpoint of an earlier version: the headline only
            state.before_sets = {evaluate.sets[0].spec.name: state.before}
        with Recorder(out_dir, state.step, cfg.steps, parts.on_ray, log, cfg) as record:
            state = survive(cfg, parts, sampler, live, record, state, tok, evaluate)
        after = evaluate("after")  # the engines serve the last step's weights
        export_run(out_dir, cfg.model, parts.trainers, log)
        log(f"trained model: {out_dir / FINAL} (HF format: caravela serve / eval take it)")
    first = next(iter(after.values()))
    write_report(out_dir, state.before_sets, after, record.history)
    return RunSummary(state.before, first, record.history, state.before_sets, after)


def evaluate_only(cfg: RunConfig, log: Log = print) -> dict[str, EvalResult]:
    """``caravela eval``: the held-out sets of ``cfg`` evaluated on ``cfg.model`` (an HF
    model directory, a run directory or a checkpoint: ``orchestrator.export.served_model``),
    with one transformers engine and a pool per env in this process."""
    from inference_server.local_router import LocalRouter
    from inference_server.transformers_backend import TransformersEngine
    from reward_envs.scorer import LocalScorer

    sets = load_sets(cfg)
    with served_model(cfg.model, log) as model_dir:
        model, tok = load_policy(cfg.model_copy(update={"model": model_dir}))
    engines = LocalRouter({"eval": TransformersEngine(model, tok)})
    scorer = LocalScorer(cfg.envs, log_dir=Path(cfg.output_dir) / "envs")
    try:
        results = evaluate_sets(cfg, sets, engines, scorer, tok, {})
    finally:
        scorer.close()
    for name, r in results.items():
        log(describe(f"eval [{name}]", r))
    return results
