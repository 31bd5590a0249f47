"""End to end: Caravela vs TRL's ``GRPOTrainer`` on the embedded default, side by side.

Run inside a loopback-only namespace (the Ray side starts a local cluster):
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/e2e_trl.py'``
(~18 min on 2 shared cores; ``--quick``: a ~1.5 min smoke run, not a measurement).
``--render --repeats A.json B.json`` rewrites the .md/.png from the .json and adds the
speed figures of other runs (e.g. with ``--sides`` in another order, ``--out`` elsewhere).

One process runs, back to back, the same task with the same settings:

- ``trl``: ``trl.GRPOTrainer`` (transformers ``generate``, no vLLM, ``use_cpu``), its
  settings derived from Caravela's resolved default config (``trl_config``);
- ``local``: ``orchestrator.loop.run`` with ``cluster.mode = "local"`` (one process);
- ``ray``: ``orchestrator.loop.run`` with the default ``cluster.mode = "ray"`` (a private
  local Ray cluster: engine actor, trainer rank, env pool actor);
- ``local_padded`` (``--sides`` default too): ``local`` with ``trainer.layout = "padded"``.

Same tiny model, training prompts, reward function (the ``arith`` env's ``score``; TRL
calls it in-process, Caravela through its env pool), group size, prompts per step,
``max_new_tokens``, temperature, optimiser and loss. Every ``--every`` steps each side's
weights are kept (TRL: copied in memory, the copy's time taken out of the step; Caravela,
either mode: the run's own checkpoints, ``checkpoint.every_steps``, inside the timed step).
After all sides have trained, each copy is scored by the same function, ``orchestrator.evaluate.
evaluate_passk`` (greedy, sampled pass@1 and pass@k, the arith ``score`` in-process, seed
``cfg.seed``) on the first ``--eval-prompts`` held-out prompts; step 0 (the shipped model,
shared by all sides) is scored once.

Reported per side: median step seconds after ``WARMUP`` steps, steps/s and its ratio to
TRL's; time axis = cumulative step seconds (the training loop: generate, score, train,
weight push; start-up and evaluation left out, reported separately); held-out accuracy at
each kept step; seconds of training loop to reach each accuracy target. Writes
``bench/results/e2e_trl.{json,md,png}`` (``--quick``: ``e2e_trl_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("CARAVELA_ENV_STORE", str(REPO / ".cache" / "env-store"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import orchestrator.loop as loop  # noqa: E402
from orchestrator.config import RunConfig, load_config  # noqa: E402
from orchestrator.evaluate import evaluate_passk, in_process  # noqa: E402
from reward_envs.builtin.arith.env import score  # noqa: E402
from trainer import checkpoint  # noqa: E402

WARMUP = 3  # steps left out of the median step time
TARGETS = (0.45, 0.50, 0.55, 0.60)  # held-out sampled pass@1 levels for "time to accuracy"
REPEAT_KEYS = ("median_step_seconds", "speed_vs_trl", "time_to_pass1", "load_avg_before_after")
Weights = dict[str, torch.Tensor]


@dataclass
class Side:
    """What one side's training run left behind."""

    name: str
    step_seconds: list[float] = field(default_factory=list)
    kept: dict[int, Weights] = field(default_factory=dict)  # steps done -> weights
    wall_seconds: float = 0.0  # from the side's start (model load) to its end
    phases: dict[str, list[float]] = field(default_factory=dict)  # per-step phase seconds
    train_reward: list[float] = field(default_factory=list)
    groups_trained: list[float] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None


def snapshot(model: Any) -> Weights:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def caravela_config(args: argparse.Namespace, out: Path, extra: list[str]) -> RunConfig:
    """The embedded default with this run's length, checkpoints and a minimal built-in
    before/after evaluation (held-out accuracy is measured by this script instead)."""
    return load_config(
        overrides=[
            f"steps={args.steps}",
            f"output_dir='{out}'",
            "eval.num_prompts=8",
            "eval.k=1",
            f"checkpoint.every_steps={args.every}",
            f"checkpoint.keep={args.steps // args.every + 2}",
            *extra,
        ]
    )


def trl_config(cfg: RunConfig, out: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """TRL's ``GRPOConfig`` equal to ``cfg`` where TRL has the knob, the arguments given to
    it, and what differs, in words."""
    from trl import GRPOConfig

    loss = cfg.trainer.loss
    differs: list[str] = []
    if cfg.advantage.type != "grpo":
        raise ValueError(f"advantage.type={cfg.advantage.type!r} has no GRPOTrainer equivalent")
    if loss.tis_cap is not None:
        differs.append("loss.tis_cap: TRL only corrects against vLLM logprobs; off here")
    if cfg.advantage.drop_zero_variance:
        differs.append(
            "zero-variance groups: Caravela drops them before the forward pass and the grpo "
            "loss averages over the kept sequences; TRL trains all G x prompts sequences (their "
            "advantage is 0, so they add nothing but count in the mean: TRL's gradient is "
            "Caravela's x kept/total before clipping; Adam undoes most of a constant scale)"
        )
    warm = cfg.trainer.warmup_steps
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=cfg.trainer.dtype == "bfloat16",
        max_steps=cfg.steps,
        seed=cfg.seed,
        # optimiser (Caravela: torch.optim.AdamW, constant lr after linear warm-up)
        learning_rate=cfg.trainer.lr,
        adam_beta1=cfg.trainer.betas[0],
        adam_beta2=cfg.trainer.betas[1],
        weight_decay=cfg.trainer.weight_decay,
        max_grad_norm=cfg.trainer.max_grad_norm,
        lr_scheduler_type="constant_with_warmup" if warm else "constant",
        warmup_steps=warm,
        # loss
        loss_type="grpo" if loss.type == "gspo" else loss.type,
        importance_sampling_level="sequence" if loss.type == "gspo" else "token",
        epsilon=loss.eps_low,
        epsilon_high=loss.eps_high,
        beta=loss.kl_beta,
        scale_rewards="group" if cfg.advantage.scale_by_std else "none",
        num_iterations=1,
        # rollout: one generation batch = one optimizer step of prompts x G completions
        num_generations=cfg.rollout.group_size,
        per_device_train_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
        gradient_accumulation_steps=1,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing,
        # bookkeeping
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
    )
    args = GRPOConfig(**kwargs)
    differs += [
        "prompt order: Caravela's seeded epoch shuffle vs TRL's RepeatSampler (seed "
        f"{cfg.seed}): the sides train on different prompts in a different order",
        "sampling RNG: different streams, so different completions from the same weights",
        "reward: same function (arith env's score); TRL calls it in-process, Caravela "
        "through the env's pool (a worker in the env's own venv, pipe protocol)",
        f"training layout: Caravela `{cfg.trainer.layout}` (pack_row_tokens "
        f"{cfg.trainer.pack_row_tokens}, {cfg.trainer.max_tokens_per_micro_batch} tokens per "
        "micro-batch, chunked LM-head logprobs); TRL one left/right-padded micro-batch of "
        "every sequence of the step, full logits (vocab 23)",
        f"optimiser implementation: TRL's default `{getattr(args.optim, 'value', args.optim)}`"
        " vs torch.optim.AdamW (same update rule)",
        "TRL computes per-token entropy and its metrics every step (its defaults); "
        "Caravela's ray side pushes weights to the engine and runs the logprob probe "
        "every step, and writes its checkpoints inside the timed steps",
    ]
    return args, kwargs, differs


def trl_defaults_changed(kwargs: dict[str, Any]) -> list[str]:
    """``name default -> value`` for every GRPOConfig argument set away from TRL's default."""
    from trl import GRPOConfig

    default = vars(GRPOConfig(output_dir="unused", use_cpu=True))  # bf16 default needs it
    name = lambda v: str(getattr(v, "value", v))  # noqa: E731  enums as their values
    return [
        f"{k} {name(default.get(k))} -> {name(v)}"
        for k, v in kwargs.items()
        if k != "output_dir" and name(default.get(k)) != name(v)
    ]


def run_trl(cfg: RunConfig, args: argparse.Namespace, out: Path) -> Side:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    side = Side("trl")
    t_start = time.perf_counter()
    rows = [json.loads(x) for x in Path(cfg.datasets[0].path).read_text().splitlines() if x]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list:
        return [score(p, c, a) for p, c, a in zip(prompts, completions, answer, strict=True)]

    grpo_args, _, _ = trl_config(cfg, out)
    model, tok = loop.load_policy(cfg)
    mark, every = [0.0], args.every
    gen: list[float] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            gen.append(time.perf_counter() - t0)
            return result

    class Keep(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            side.kept[0] = snapshot(kw["model"])
            mark[0] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            side.step_seconds.append(time.perf_counter() - mark[0])
            if state.global_step % every == 0:
                side.kept[state.global_step] = snapshot(kw["model"])
            mark[0] = time.perf_counter()  # the copy's time is not the step's

    trainer = Timed(model, reward, grpo_args, dataset, processing_class=tok, callbacks=[Keep()])
    trainer.train()
    side.wall_seconds = time.perf_counter() - t_start
    side.phases["rollout"] = gen
    side.phases["train"] = [s - g for s, g in zip(side.step_seconds, gen, strict=False)]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    side.train_reward = [float(h["reward"]) for h in logs]
    side.groups_trained = [
        cfg.rollout.prompts_per_step * (1 - float(h.get("frac_reward_zero_std", 0))) for h in logs
    ]
    return side


def run_caravela(name: str, cfg: RunConfig, args: argparse.Namespace) -> Side:
    """``orchestrator.loop.run`` (one loop, either mode); the weights of every ``every``-th
    step are read back from the run's checkpoints (written inside the timed steps)."""
    side = Side(name)
    t_start = time.perf_counter()
    summary = loop.run(cfg, log=lambda *_: None)
    side.wall_seconds = time.perf_counter() - t_start
    h = summary.history
    side.step_seconds = [x["step_seconds"] for x in h]
    side.train_reward = [x["reward_mean"] for x in h]
    side.groups_trained = [x["groups_kept"] for x in h]
    side.phases["train"] = [x.get("seconds", 0.0) for x in h]  # Trainer.train_step
    side.phases["rollout"] = [x["seconds/generate"] + x["seconds/score"] for x in h]
    side.phases["sync"] = [x.get("seconds/sync", 0.0) for x in h]
    side.kept[0] = snapshot(loop.load_policy(cfg)[0])
    for ckpt in sorted((Path(cfg.output_dir) / "checkpoints").glob("step-*")):
        side.kept[int(ckpt.name.split("-")[1])] = checkpoint.weights(ckpt)
    return side


def evaluate_kept(
    cfg: RunConfig, sides: list[Side], n: int, k: int, log: Callable[[str], None]
) -> dict[str, dict[int, dict[str, float]]]:
    """Held-out accuracy of every kept copy; step 0 (the shipped model) once for all."""
    rows = [json.loads(x) for x in Path(cfg.eval.heldout).read_text().splitlines() if x][:n]
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    model, tok = loop.load_policy(cfg)
    ro = cfg.rollout
    sampling: dict[str, Any] = {
        "temperature": ro.temperature,
        "max_new_tokens": ro.max_new_tokens,
        "seed": cfg.seed,
    }
    cache: dict[str, Any] = {}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for side in sides:
        out[side.name] = {}
        for step, weights in sorted(side.kept.items()):
            key = "step0" if step == 0 else f"{side.name}/{step}"
            if key not in cache:
                model.load_state_dict(weights)
                t0 = time.perf_counter()
                r = evaluate_passk(model, tok, rows, in_process(score), k, **sampling)
                seconds = time.perf_counter() - t0
                cache[key] = {"greedy": r.greedy_acc, "pass1": r.pass1, f"pass{k}": r.passk}
                cache[key]["eval_seconds"] = seconds
                log(f"  eval {key}: pass@1 {r.pass1:.3f}  greedy {r.greedy_acc:.3f}")
            out[side.name][step] = cache[key]
    return out


def summarize(side: Side, acc: dict[int, dict[str, float]], trl_rate: float | None) -> dict:
    timed = side.step_seconds[WARMUP:] or side.step_seconds
    med = statistics.median(timed)
    cumulative = [sum(side.step_seconds[:s]) for s in sorted(acc)]
    curve = [
        {"step": s, "loop_seconds": t, **acc[s]}
        for s, t in zip(sorted(acc), cumulative, strict=True)
    ]
    reach = {}
    for target in TARGETS:
        hit = next((c for c in curve if c["pass1"] >= target), None)
        reach[f"{target:.2f}"] = (
            None if hit is None else {k: hit[k] for k in ("step", "loop_seconds")}
        )
    return {
        "steps": len(side.step_seconds),
        "median_step_seconds": med,
        "steps_per_second": 1 / med,
        "speed_vs_trl": None if trl_rate is None else (1 / med) / trl_rate,
        "median_phase_seconds": {
            k: statistics.median(v[WARMUP:] or v) for k, v in side.phases.items() if v
        },
        "loop_seconds": sum(side.step_seconds),
        "wall_seconds": side.wall_seconds,
        "overhead_seconds": side.wall_seconds - sum(side.step_seconds),
        "mean_groups_trained": statistics.fmean(side.groups_trained),
        "train_reward_first10_last10": [
            statistics.fmean(side.train_reward[:10]),
            statistics.fmean(side.train_reward[-10:]),
        ],
        "curve": curve,
        "time_to_pass1": reach,
        "load_avg_before_after": [side.load_before, side.load_after],
        "step_seconds": side.step_seconds,
    }


def repeat_summary(other: dict) -> dict:
    """The speed and time-to-accuracy figures of another run of this script (a repeat)."""
    return {
        "order": list(other["settings"]["sides"]),
        "sides": {
            n: {k: r[k] for k in REPEAT_KEYS} for n, r in other["sides"].items() if "error" not in r
        },
    }


def render(result: dict, stem: Path) -> None:
    """``<stem>.md`` and ``<stem>.png`` from the result dict."""
    s, k = result["settings"], result["settings"]["eval_k"]
    c = result["caravela_config"]
    ro, tr = c["rollout"], c["trainer"]
    ok = {n: r for n, r in result["sides"].items() if "error" not in r}
    lines = [
        f"# End to end vs TRL {result['env']['trl']} GRPOTrainer, embedded default, 2 CPU cores",
        "",
        f"{s['steps']} steps of {ro['prompts_per_step']} prompts x {ro['group_size']} "
        f"completions, max_new_tokens {ro['max_new_tokens']}, T = {ro['temperature']}, lr "
        f"{tr['lr']}, loss `{tr['loss']['type']}`, advantage scaled by std "
        f"{c['advantage']['scale_by_std']}, seed {c['seed']}. Held-out: first "
        f"{s['eval_prompts']} prompts, k = {k}, one `evaluate_passk` for every side. Step "
        f"time: median after {WARMUP} warm-up steps; loop s = sum of step seconds (start-up "
        "and evaluation excluded). torch threads per process: "
        f"{result['env']['torch_threads']}. Shared 2-core box (other sessions' jobs ran "
        "throughout: see the load averages); ratios, not absolute seconds, are the result. "
        "Groups with signal: groups whose rewards differ (Caravela trains only these, TRL "
        "trains every group).",
        "",
        "| side | s/step | steps/s | vs TRL | rollout s | train s | groups with signal | loop s | "
        "start-up + rest s | load avg 1-min before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in ok.items():
        ph = r["median_phase_seconds"]
        (lb, *_), (la, *_) = r["load_avg_before_after"]
        lines.append(
            f"| {name} | {r['median_step_seconds']:.2f} | {r['steps_per_second']:.2f} | "
            f"{r['speed_vs_trl']:.2f}x | {ph.get('rollout', float('nan')):.2f} | "
            f"{ph.get('train', float('nan')):.2f} | {r['mean_groups_trained']:.1f} | "
            f"{r['loop_seconds']:.0f} | {r['overhead_seconds']:.0f} | {lb:.1f} / {la:.1f} |"
        )
    for name, r in result["sides"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'].splitlines()[-1][:120]} ||||||||")
    steps = sorted({c["step"] for r in ok.values() for c in r["curve"]})
    lines += [
        "",
        f"Held-out sampled pass@1 (greedy in brackets) at step, k = {k}:",
        "",
        "| side | " + " | ".join(str(x) for x in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for name, r in ok.items():
        by = {c["step"]: c for c in r["curve"]}
        cells = [f"{by[x]['pass1']:.3f} ({by[x]['greedy']:.2f})" if x in by else "" for x in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    head = ["target", *ok, *(f"TRL s / {n} s" for n in ok if n != "trl")]
    lines += [
        "",
        "Training-loop seconds to the first kept step with held-out pass@1 >= target "
        f"(resolution: every {s['every']} steps; - = not reached):",
        "",
        "| " + " | ".join(head) + " |",
        "|---:|" + "---:|" * (len(head) - 1),
    ]
    for target in (f"{t:.2f}" for t in TARGETS):
        hits = {n: r["time_to_pass1"][target] for n, r in ok.items()}
        cells = [
            f"{h['loop_seconds']:.0f} s (step {h['step']})" if h else "-" for h in hits.values()
        ]
        t_trl = hits.get("trl")
        ratios = [
            f"{t_trl['loop_seconds'] / h['loop_seconds']:.2f}x" if t_trl and h else "-"
            for n, h in hits.items()
            if n != "trl"
        ]
        lines.append(f"| {target} | " + " | ".join(cells + ratios) + " |")
    for i, rep in enumerate(result.get("repeats", []), 1):
        if i == 1:
            lines += [
                "",
                "Repeats of the same command with the sides in another order (s/step, speed vs "
                "TRL, training-loop seconds to held-out pass@1 >= 0.55):",
                "",
                "| run | order | " + " | ".join(ok) + " |",
                "|---|---|" + "---|" * len(ok),
            ]
        cells = []
        for r in (rep["sides"].get(n, {}) for n in ok):
            hit = r.get("time_to_pass1", {}).get("0.55")
            reach = f"{hit['loop_seconds']:.0f} s" if hit else "not reached"
            speed = f"{r['median_step_seconds']:.2f} s, {r['speed_vs_trl']:.2f}x" if r else "-"
            cells.append(f"{speed}, {reach}" if r else "-")
        lines.append(f"| repeat {i} | {', '.join(rep['order'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Sides ran back to back in this order: {', '.join(s['sides'])}.",
        "",
        "TRL settings changed from GRPOConfig's defaults to match Caravela's: "
        + "; ".join(f"`{c}`" for c in result.get("trl_defaults_changed", []))
        + ".",
        "",
        "Settings that differ between the sides:",
        "",
    ]
    lines += [f"- {d}" for d in result["differences"]]
    lines += ["", f"![held-out pass@1 vs training-loop seconds]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    if ok:
        plot(result, stem)


def plot(result: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["sides"].items():
        if "error" in r:
            continue
        c = r["curve"]
        ax_t.plot([x["loop_seconds"] for x in c], [x["pass1"] for x in c], "o-", label=name)
        ax_s.plot([x["step"] for x in c], [x["pass1"] for x in c], "o-", label=name)
    ax_t.set_xlabel("training-loop seconds (2 shared CPU cores)")
    ax_s.set_xlabel("optimizer step")
    for ax in (ax_t, ax_s):
        ax.set_ylabel(f"held-out sampled pass@1 ({result['settings']['eval_prompts']} prompts)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Caravela vs TRL {result['env']['trl']} GRPOTrainer, tiny arith model")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=20, help="keep weights every N steps")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-k", type=int, default=8)
    p.add_argument("--sides", default="trl,local,ray,local_padded")
    threads = "torch threads of this process (trl, local) and of each Ray engine and trainer "
    threads += "rank (ray); 1 keeps a shared box steady (with 2, generate ran 10x slower here)"
    p.add_argument("--threads", type=int, default=1, help=threads)
    p.add_argument("--quick", action="store_true", help="6 steps, tiny eval: a smoke run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "e2e_trl")
    render_help = "no training: rewrite <out>.md/.png from <out>.json, adding --repeats"
    p.add_argument("--render", action="store_true", help=render_help)
    p.add_argument("--repeats", type=Path, nargs="*", default=[], help="other runs' JSON")
    args = p.parse_args()
    if args.render:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["repeats"] = [repeat_summary(json.loads(x.read_text())) for x in args.repeats]
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        render(result, args.out)
        return
    if args.quick:
        args.steps, args.every, args.eval_prompts, args.eval_k = 6, 3, 16, 2
        args.out = args.out.with_name(args.out.name + "_quick")
    overrides = {
        "trl": [],
        "local": ["cluster.mode='local'"],
        "ray": [
            f"trainer.cpus_per_rank={args.threads}",
            "inference.backend.type='transformers'",  # the union needs its tag with --set
            f"inference.backend.cpus_per_engine={args.threads}",
        ],
        "local_padded": ["cluster.mode='local'", "trainer.layout='padded'"],
    }
    names = args.sides.split(",")
    if unknown := set(names) - set(overrides):
        p.error(f"unknown sides {sorted(unknown)}; choose from {sorted(overrides)}")
    torch.set_num_threads(args.threads)
    import datasets
    import ray
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        base = caravela_config(args, Path(tmp) / "base", [])
        _, trl_kwargs, differences = trl_config(base, Path(tmp) / "trl")
        sides: list[Side] = []
        for name in names:
            print(f"== {name}", flush=True)
            cfg = caravela_config(args, Path(tmp) / name, overrides[name])
            load = os.getloadavg()
            try:
                side = (
                    run_trl(cfg, args, Path(tmp) / name)
                    if name == "trl"
                    else (run_caravela(name, cfg, args))
                )
            except Exception:  # one side failing must not lose the others' numbers
                side = Side(name, error=traceback.format_exc())
                print(side.error, flush=True)
            side.load_before, side.load_after = load, os.getloadavg()
            sides.append(side)
        print("== held-out evaluation", flush=True)
        acc = evaluate_kept(
            base, [s for s in sides if not s.error], args.eval_prompts, args.eval_k, print
        )
    trl_rate = None
    out_sides: dict[str, Any] = {}
    for side in sorted(sides, key=lambda s: s.name != "trl"):
        if side.error:
            out_sides[side.name] = {"error": side.error}
            continue
        out_sides[side.name] = summarize(side, acc[side.name], trl_rate)
        if side.name == "trl":
            trl_rate = out_sides["trl"]["steps_per_second"]
            out_sides["trl"]["speed_vs_trl"] = 1.0
    result = {
        "settings": {
            **{k: getattr(args, k) for k in ("steps", "every", "eval_prompts", "eval_k")},
            "sides": {n: overrides[n] for n in names},
        },
        "caravela_config": base.model_dump(mode="json"),
        "trl_args": {k: v for k, v in trl_kwargs.items() if k != "output_dir"},
        "trl_defaults_changed": trl_defaults_changed(trl_kwargs),
        "differences": differences,
        "env": {
            **{m.__name__: m.__version__ for m in (trl, transformers, torch, datasets, ray)},
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
        },
        "sides": out_sides,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    render(result, args.out)


if __name__ == "__main__":
    main()
