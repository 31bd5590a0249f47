"""CPU trainer throughput: ``layout="packed"`` vs ``layout="padded"`` on the same samples.

Runs ``trainer.trainer.Trainer.train_step`` (layout, per-micro-batch forward, chunked
logprobs, GRPO loss, backward, grad clip, AdamW) on a random LlamaForCausalLM built
from a config (no hub download). Both layouts get the same samples, the same token
budget per micro-batch and identical initial weights; after one warm-up step each,
timed steps alternate packed / padded so drift (thermal, other load) hits both alike.

Useful tokens are prompt + completion tokens (padding excluded); tokens/s is
useful tokens over wall-clock seconds of ``train_step``.

    .venv/bin/python bench/cpu_packing.py            # full run, ~2-4 min on 2 cores
    .venv/bin/python bench/cpu_packing.py --quick    # smoke run, < 30 s

Writes ``bench/results/cpu_packing.json`` and ``.md`` (``--out`` changes the path).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from trainer.config import TrainerConfig  # noqa: E402
from trainer.packing import padding_fraction  # noqa: E402
from trainer.protocol import TrainBatch, TrainSample  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    m = p.add_argument_group("model (random LlamaForCausalLM)")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--intermediate", type=int, default=1024)
    m.add_argument("--vocab", type=int, default=2048)
    m.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    d = p.add_argument_group("data (one step = prompts x group samples)")
    d.add_argument("--prompts", type=int, default=4, help="prompts per step")
    d.add_argument("--group", type=int, default=8, help="completions per prompt")
    d.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    d.add_argument(
        "--completion-dist",
        choices=["lognormal", "uniform"],
        default="lognormal",
        help="lognormal: median --completion-median, sigma --completion-sigma, clipped to range",
    )
    d.add_argument("--completion-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    d.add_argument("--completion-median", type=float, default=160.0)
    d.add_argument("--completion-sigma", type=float, default=0.9)
    t = p.add_argument_group("trainer")
    t.add_argument("--max-tokens", type=int, default=8192, help="max_tokens_per_micro_batch")
    t.add_argument("--row-tokens", type=int, default=1024, help="pack_row_tokens")
    t.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_size")
    t.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps per layout")
    t.add_argument(
        "--sorted-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time padded with samples sorted by length (a stronger padded baseline)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 30 s)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_packing.json")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 2, 2
        args.intermediate, args.vocab = 128, 512
        args.prompts, args.group, args.steps = 4, 4, 1
        args.sorted_baseline = False
        if args.out == p.get_default("out"):
            args.out = args.out.with_name("cpu_packing_quick.json")
    return args


def completion_length(rng: random.Random, args: argparse.Namespace) -> int:
    lo, hi = args.completion_len
    if args.completion_dist == "uniform":
        return rng.randint(lo, hi)
    n = round(rng.lognormvariate(math.log(args.completion_median), args.completion_sigma))
    return min(max(n, lo), hi)


def make_batch(step: int, args: argparse.Namespace) -> TrainBatch:
    """GRPO-shaped batch: ``prompts`` groups of ``group`` completions sharing one prompt."""
    rng = random.Random(args.seed * 100_003 + step)
    samples = []
    for p in range(args.prompts):
        prompt = [rng.randrange(1, args.vocab) for _ in range(rng.randint(*args.prompt_len))]
        for g in range(args.group):
            n = completion_length(rng, args)
            samples.append(
                TrainSample(
                    sample_id=f"s{step}-p{p}-g{g}",
                    prompt_ids=prompt,
                    completion_ids=[rng.randrange(1, args.vocab) for _ in range(n)],
                    advantage=rng.gauss(0.0, 1.0),
                )
            )
    return TrainBatch(step=step, samples=samples, max_completion_length=args.completion_len[1])


def sort_by_length(batch: TrainBatch) -> TrainBatch:
    """Same samples, longest first: the padded layout then groups similar lengths."""
    order = sorted(batch.samples, key=lambda s: -(len(s.prompt_ids) + len(s.completion_ids)))
    return batch.model_copy(update={"samples": order})


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation=args.attn,
    )
    return LlamaForCausalLM(cfg).float()


def layout_stats(trainer: Trainer, batch: TrainBatch) -> dict[str, float]:
    micro = trainer.layout(batch)
    return {
        "micro_batches": len(micro),
        "rows": sum(mb.input_ids.shape[0] for mb in micro),
        "padding_frac": padding_fraction(micro),
        "capacity_tokens": sum(mb.capacity for mb in micro),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    variants = {"packed": "packed", "padded": "padded"}
    if args.sorted_baseline:
        variants["padded_sorted"] = "padded"
    trainers = {}
    for name, layout in variants.items():
        cfg = TrainerConfig(
            layout=layout,
            max_tokens_per_micro_batch=args.max_tokens,
            pack_row_tokens=args.row_tokens,
            logprob_chunk_size=min(args.chunk, args.max_tokens),
            lr=1e-5,
            seed=args.seed,
        )
        trainers[name] = Trainer(copy.deepcopy(model), cfg)

    def batch_for(name: str, step: int) -> TrainBatch:
        b = make_batch(step, args)
        return sort_by_length(b) if name == "padded_sorted" else b

    print(
        f"model: {n_params / 1e6:.2f}M params, {args.layers}x{args.hidden}, vocab {args.vocab}, "
        f"attn {args.attn}, threads {torch.get_num_threads()}"
    )
    for name, tr in trainers.items():
        for w in range(args.warmup):
            t0 = time.perf_counter()
            tr.train_step(batch_for(name, 1000 + w))  # batches unlike the timed ones
            print(f"warm-up {name}: {time.perf_counter() - t0:.2f} s")

    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    for step in range(args.steps):
        for name, tr in trainers.items():
            batch = batch_for(name, step)
            stats = layout_stats(tr, batch)
            t0 = time.perf_counter()
            metrics = tr.train_step(batch)
            seconds = time.perf_counter() - t0
            row = {"step": step, "seconds": seconds, "tokens": metrics["tokens"], **stats}
            row["loss_tokens"] = sum(len(s.completion_ids) for s in batch.samples)
            per_step[name].append(row)
            print(
                f"step {step} {name:13s} {seconds:6.2f} s  {metrics['tokens'] / seconds:8.0f} tok/s"
                f"  padding {stats['padding_frac']:.3f}  micro-batches {stats['micro_batches']}"
            )

    results: dict[str, dict[str, float]] = {}
    for name, rows in per_step.items():
        secs = sum(r["seconds"] for r in rows)
        toks = sum(r["tokens"] for r in rows)
        cap = sum(r["capacity_tokens"] for r in rows)
        results[name] = {
            "useful_tokens_per_s": toks / secs,
            "computed_tokens_per_s": cap / secs,
            "seconds_per_step": secs / len(rows),
            "padding_frac": 1.0 - toks / cap,
            "micro_batches_per_step": sum(r["micro_batches"] for r in rows) / len(rows),
            "rows_per_step": sum(r["rows"] for r in rows) / len(rows),
            "useful_tokens_per_step": toks / len(rows),
            "loss_tokens_per_step": sum(r["loss_tokens"] for r in rows) / len(rows),
        }
    base = results["padded"]["useful_tokens_per_s"]
    for r in results.values():
        r["ratio_vs_padded"] = r["useful_tokens_per_s"] / base

    out = {
        "benchmark": "cpu_packing",
        "quick": args.quick,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "n_params": n_params,
        "environment": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            # other processes on the machine skew absolute numbers (alternation keeps the
            # comparison fair-ish); 1-minute load average before and after the run:
            "load_average_1m": [load_before[0], os.getloadavg()[0]],
        },
        "results": results,
        "per_step": per_step,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out["config"]["out"] = str(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return out


def markdown(out: dict) -> str:
    c = out["config"]
    lines = [
        f"# cpu_packing{' (quick)' if out['quick'] else ''}",
        "",
        f"Random Llama {out['n_params'] / 1e6:.2f}M params ({c['layers']} layers, hidden "
        f"{c['hidden']}, vocab {c['vocab']}, attn {c['attn']}), fp32, "
        f"{out['environment']['threads']} threads, torch {out['environment']['torch']}, "
        f"transformers {out['environment']['transformers']}, 1-min load average "
        f"{out['environment']['load_average_1m'][0]:.1f} -> "
        f"{out['environment']['load_average_1m'][1]:.1f} on {out['environment']['cpu_count']} "
        "cores.",
        f"Step = {c['prompts']} prompts x {c['group']} completions; prompt len uniform "
        f"{c['prompt_len'][0]}-{c['prompt_len'][1]}, completion len {c['completion_dist']} "
        f"{c['completion_len'][0]}-{c['completion_len'][1]}"
        + (
            f" (median {c['completion_median']:g}, sigma {c['completion_sigma']:g})"
            if c["completion_dist"] == "lognormal"
            else ""
        )
        + f". max_tokens_per_micro_batch {c['max_tokens']}, pack_row_tokens {c['row_tokens']}, "
        f"{c['warmup']} warm-up + {c['steps']} timed steps per layout (alternating).",
        "",
        "| variant | useful tok/s | s/step | padding | micro-batches/step | ratio vs padded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["results"].items():
        lines.append(
            f"| {name} | {r['useful_tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | "
            f"{r['padding_frac']:.1%} | {r['micro_batches_per_step']:.1f} | "
            f"{r['ratio_vs_padded']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
