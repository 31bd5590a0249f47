"""GPU training-step benchmark: the project's packed path vs plain padded HF training.

Model: a RANDOM Qwen2-0.5B-shaped ``Qwen2ForCausalLM`` (hidden 896, 24 layers, 14 heads,
2 kv heads, intermediate 4864, vocab 151936, tied embeddings, bf16), built from a config.
Data: ``--num-seqs`` sequences per optimizer step, lengths uniform in ``--seq-len``
(128-2048, seeded), each split into a prompt (uniform 16-256 tokens) and a completion
(the rest; the loss covers completion tokens only). Every variant sees the same
steps' samples and the same token budget per micro-batch (``--budget``).

Variants (``padded_hf`` baseline, ``packed_flex``, ``packed_sdpa``, ``padded_chunked``,
``packed_flex_static``), the MFU formula, the correctness check with its leak control and
the warm-up/robustness rules are described in ``bench/README.md``.

Only torch + transformers (+ triton for flex on CUDA) are needed: this script imports
``trainer.packing``, ``trainer.logprobs`` and ``trainer.loss`` only (not
``trainer.trainer``, whose config needs pydantic).

    python bench/gpu_trainer.py                          # H100: a few minutes (estimate)
    python bench/gpu_trainer.py --device cpu --tiny      # same code path on CPU, ~20 s
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from gpu_report import environment, markdown, peak_flops_for, write  # noqa: E402  (bench/)
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from trainer.logprobs import micro_batch_logprobs  # noqa: E402
from trainer.loss import LossInputs, LossParams, policy_loss  # noqa: E402
from trainer.packing import MicroBatch, build_packed, build_padded, padding_fraction  # noqa: E402

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Run in this order: flex last, because its first compile may take minutes.
VARIANTS = (
    "padded_hf",
    "packed_sdpa",
    "padded_chunked",
    "packed_flex",
    "packed_flex_static",
)
DEFAULT_VARIANTS = VARIANTS[:4]

Seq = tuple[list[int], list[int]]


# --------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model/data (for CPU checks)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--num-seqs", type=int, default=64, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, nargs=2, default=(128, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--budget", type=int, default=16384, help="tokens per micro-batch")
    p.add_argument("--flex-row-tokens", type=int, default=None, help="default: --budget")
    p.add_argument("--sdpa-row-tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=1024, help="chunked LM head rows")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--check-seqs", type=int, default=8, help="0 disables the correctness check")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--peak-tflops", type=float, default=None, help="override MFU peak")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds; see doc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="CPU only; 1 avoids oversubscribing a busy box"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_seqs = min(args.num_seqs, 16)
        args.seq_len, args.prompt_len = (16, 256), (4, 32)
        args.budget, args.sdpa_row_tokens, args.chunk = 1024, 256, 128
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.check_seqs = min(args.check_seqs, 6)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.flex_row_tokens is None:
        args.flex_row_tokens = args.budget
    if args.out is None:
        name = (
            "gpu_trainer"
            + ("_tiny" if args.tiny else "")
            + ("_cpu" if args.device == "cpu" else "")
        )
        args.out = REPO / "bench" / "results" / f"{name}.json"
    return args


def model_config(tiny: bool) -> Qwen2Config:
    if tiny:
        shape = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=1024,
        )
    else:  # Qwen2-0.5B
        shape = dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
        )
    return Qwen2Config(
        **shape,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


def build_model(args: argparse.Namespace, device: torch.device) -> Qwen2ForCausalLM:
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(model_config(args.tiny))
    return model.to(getattr(torch, args.dtype)).train()


def set_attn(model: torch.nn.Module, impl: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl
    assert model.config._attn_implementation == impl, model.config._attn_implementation


def make_step(index: int, args: argparse.Namespace, vocab: int) -> tuple[list[Seq], list[float]]:
    """One optimizer step's samples: (prompt_ids, completion_ids) pairs and advantages."""
    rng = random.Random(args.seed * 1_000_003 + index)
    seqs, adv = [], []
    for _ in range(args.num_seqs):
        n = rng.randint(*args.seq_len)
        p = min(rng.randint(*args.prompt_len), n - 1)
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        seqs.append((ids[:p], ids[p:]))
        adv.append(rng.gauss(0.0, 1.0))
    return seqs, adv


# --------------------------------------------------------------------------- forward paths


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    return dataclasses.replace(
        mb,
        input_ids=mv(mb.input_ids),
        position_ids=mv(mb.position_ids),
        attention_mask=mv(mb.attention_mask),
        target_index=mv(mb.target_index),
        target_ids=mv(mb.target_ids),
        seq_ids=mv(mb.seq_ids),
    )


def pad_width(mb: MicroBatch, width: int) -> MicroBatch:
    """Right-extend every row to ``width`` with a dummy pad segment (positions restart at 0).

    Gives flex_attention one static shape (no dynamic-shape recompile); the extra slots
    count as padding.
    """
    rows, old = mb.input_ids.shape
    if old >= width:
        return mb
    extra = width - old
    ids = torch.cat([mb.input_ids, mb.input_ids.new_zeros(rows, extra)], 1)
    pos = torch.cat([mb.position_ids, torch.arange(extra).expand(rows, extra)], 1)
    tidx = (mb.target_index // old) * width + mb.target_index % old
    return dataclasses.replace(
        mb, input_ids=ids, position_ids=pos, target_index=tidx, capacity=rows * width
    )


def chunked_logprobs(model: torch.nn.Module, mb: MicroBatch, chunk: int) -> torch.Tensor:
    """The project's path: ``trainer.logprobs.micro_batch_logprobs`` (chunked LM head)."""
    logps, _entropy = micro_batch_logprobs(model, mb, chunk)
    return logps


def full_logits_logprobs(model: torch.nn.Module, mb: MicroBatch, chunk: int) -> torch.Tensor:
    """Plain HF: full ``[R, L, V]`` logits, fp32 log_softmax, gather the next tokens."""
    del chunk
    logits = model(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        position_ids=mb.position_ids if mb.attention_mask is None else None,
        use_cache=False,
    ).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    next_ids = torch.roll(mb.input_ids, shifts=-1, dims=1)
    per_pos = logp.gather(-1, next_ids[..., None]).squeeze(-1)
    return per_pos.reshape(-1)[mb.target_index]


LogprobFn = Callable[[torch.nn.Module, MicroBatch, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Variant:
    attn: str
    layout: Callable[[list[Seq], argparse.Namespace], list[MicroBatch]]
    logprobs: LogprobFn
    note: str


def variants_table() -> dict[str, Variant]:
    def padded(seqs: list[Seq], a: argparse.Namespace) -> list[MicroBatch]:
        return build_padded(seqs, a.budget)

    def packed_flex(seqs: list[Seq], a: argparse.Namespace) -> list[MicroBatch]:
        return build_packed(seqs, a.budget, a.flex_row_tokens)

    def packed_sdpa(seqs: list[Seq], a: argparse.Namespace) -> list[MicroBatch]:
        return build_packed(seqs, a.budget, a.sdpa_row_tokens)

    def packed_flex_static(seqs: list[Seq], a: argparse.Namespace) -> list[MicroBatch]:
        return [pad_width(mb, a.flex_row_tokens) for mb in packed_flex(seqs, a)]

    return {
        "padded_hf": Variant(
            "sdpa", padded, full_logits_logprobs, "padded + attention_mask, full logits (HF)"
        ),
        "packed_flex": Variant(
            "flex_attention", packed_flex, chunked_logprobs, "packed, flex BlockMask, chunked"
        ),
        "packed_sdpa": Variant(
            "sdpa", packed_sdpa, chunked_logprobs, "packed, dense block-diag mask, chunked"
        ),
        "padded_chunked": Variant(
            "sdpa", padded, chunked_logprobs, "padded + attention_mask, chunked"
        ),
        "packed_flex_static": Variant(
            "flex_attention",
            packed_flex_static,
            chunked_logprobs,
            "packed_flex with every row padded to --flex-row-tokens (one static shape)",
        ),
    }


# --------------------------------------------------------------------------- training step


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    variant: Variant,
    seqs: list[Seq],
    adv: list[float],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step; the layout is built inside (as Trainer.train_step does)."""
    micro = variant.layout(seqs, args)
    num_tokens = sum(len(c) for _, c in seqs)
    advantages = torch.tensor(adv, dtype=torch.float32)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for mb_cpu in micro:
        mb = to_device(mb_cpu, device)
        logps = variant.logprobs(model, mb, args.chunk)
        inp = LossInputs(
            logprobs=logps,
            old_logprobs=logps.detach(),
            advantages=advantages[mb_cpu.sample_ids].to(device),
            seq_ids=mb.seq_ids,
            num_sequences=len(seqs),
            num_tokens=num_tokens,
            max_completion_length=args.seq_len[1],
        )
        loss, _ = policy_loss("grpo", inp, LossParams())
        loss.backward()
        total += float(loss.detach())
        del logps, inp, loss, mb
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {
        "loss": total,
        "micro_batches": len(micro),
        "rows": sum(mb.input_ids.shape[0] for mb in micro),
        "real_tokens": sum(mb.real_tokens for mb in micro),
        "capacity": sum(mb.capacity for mb in micro),
        "padding_frac": padding_fraction(micro),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(model: torch.nn.Module, device: torch.device) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(
    name: str,
    variant: Variant,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    args: argparse.Namespace,
    device: torch.device,
    n_params: int,
    peak_flops: float | None,
) -> dict:
    vocab = model.config.vocab_size
    res: dict = {"attn": variant.attn, "note": variant.note}
    if device.type == "cpu" and variant.attn == "flex_attention":
        res.update(
            status="skipped",
            reason="FlexAttention has no backward on CPU (torch raises NotImplementedError); "
            "this variant runs on CUDA only",
        )
        print(f"[{name}] skipped: {res['reason']}")
        return res
    set_attn(model, variant.attn)
    free_memory(model, device)
    t_warm = time.perf_counter()
    for w in range(args.warmup):
        t0 = time.perf_counter()
        train_step(model, opt, variant, *make_step(10_000 + w, args, vocab), args, device)
        sync(device)
        print(f"[{name}] warm-up step {w}: {time.perf_counter() - t0:.1f} s", flush=True)
    res["warmup_seconds"] = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for s in range(args.steps):
        seqs, adv = make_step(s, args, vocab)
        sync(device)
        t0 = time.perf_counter()
        stats = train_step(model, opt, variant, seqs, adv, args, device)
        sync(device)
        stats["seconds"] = time.perf_counter() - t0
        steps.append(stats)
        print(
            f"[{name}] step {s}: {stats['seconds']:.2f} s, "
            f"{stats['real_tokens'] / stats['seconds']:.0f} useful tok/s, "
            f"padding {stats['padding_frac']:.3f}, {stats['micro_batches']} micro-batches",
            flush=True,
        )
    secs = sum(s["seconds"] for s in steps)
    toks = sum(s["real_tokens"] for s in steps)
    cap = sum(s["capacity"] for s in steps)
    res.update(
        status="ok",
        useful_tokens_per_s=toks / secs,
        computed_tokens_per_s=cap / secs,
        seconds_per_step=secs / len(steps),
        padding_frac=1.0 - toks / cap,
        micro_batches_per_step=sum(s["micro_batches"] for s in steps) / len(steps),
        rows_per_step=sum(s["rows"] for s in steps) / len(steps),
        useful_tokens_per_step=toks / len(steps),
        mfu=(6 * n_params * toks / secs / peak_flops) if peak_flops else None,
        steps=steps,
    )
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return res


def guarded(name: str, fn: Callable[[], dict], model: torch.nn.Module, device: torch.device):
    """Run ``fn``; OOM and other errors become a recorded status instead of a crash."""
    t0 = time.perf_counter()
    try:
        res = fn()
    except OOM as e:
        res = {"status": "OOM", "error": str(e).splitlines()[0][:400]}
    except Exception as e:  # noqa: BLE001 - a failed variant must not kill the others
        res = {
            "status": "error",
            "error": f"{type(e).__name__}: {str(e)[:400]}",
            "traceback": traceback.format_exc()[-2000:],
        }
    if res.get("status") in ("OOM", "error"):
        print(f"[{name}] {res['status']}: {res['error']}", flush=True)
    free_memory(model, device)
    res["phase_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- correctness


def seq_logprobs(
    model: torch.nn.Module, micro: list[MicroBatch], fn: LogprobFn, chunk: int, device
) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for mb_cpu in micro:
        mb = to_device(mb_cpu, device)
        lp = fn(model, mb, chunk).detach().float().cpu()
        for local, sample in enumerate(mb_cpu.sample_ids):
            out[sample] = lp[mb_cpu.seq_ids == local]
    return out


def leak_fn(model: torch.nn.Module, mb: MicroBatch, chunk: int) -> torch.Tensor:
    """Packed row with an all-ones mask: transformers skips packed-sequence detection."""
    ones = torch.ones_like(mb.input_ids)
    return chunked_logprobs(model, dataclasses.replace(mb, attention_mask=ones), chunk)


def correctness(
    model: torch.nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    checks: list[str],
    res: dict,
) -> dict:
    """Per-token logprobs of each layout in ``checks`` vs every sequence run alone.

    Adds one entry per layout to ``res`` (which keeps the reference between calls).
    """
    rng_args = argparse.Namespace(**{**vars(args), "num_seqs": args.check_seqs})
    seqs, _ = make_step(99_999, rng_args, model.config.vocab_size)
    table = variants_table()
    # On CUDA keep grad mode on (no backward) so flex reuses the training compile;
    # on CPU flex forward only works without grad.
    grad = device.type == "cuda"
    res.setdefault("sequences", len(seqs))
    res.setdefault("lengths", [len(p) + len(c) for p, c in seqs])
    res.setdefault("reference", "each sequence alone, sdpa, full logits, same dtype")
    res.setdefault(
        "leak_control_note",
        "packed row with attention crossing sequence boundaries; a variant near this value "
        "leaks, one near padded_hf is correct up to kernel/dtype noise",
    )
    with torch.set_grad_enabled(grad):
        set_attn(model, "sdpa")
        alone = {
            i: seq_logprobs(model, build_padded([s], 10**9), full_logits_logprobs, 0, device)[0]
            for i, s in enumerate(seqs)
        }
        for name in checks:
            if name == "leak_control":
                v = Variant("sdpa", table["packed_flex"].layout, leak_fn, "")
            else:
                v = table[name]
            try:
                set_attn(model, v.attn)
                got = seq_logprobs(model, v.layout(seqs, args), v.logprobs, args.chunk, device)
                diffs = torch.cat([(got[i] - alone[i]).abs() for i in range(len(seqs))])
                res[name] = {
                    "attn": v.attn,
                    "max_abs_diff": float(diffs.max()),
                    "mean_abs_diff": float(diffs.mean()),
                }
            except Exception as e:  # noqa: BLE001
                res[name] = {"attn": v.attn, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[check] {name}: {res[name]}", flush=True)
    return res


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu --tiny")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_flops_for(device, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0)
    out: dict = {
        "benchmark": "gpu_trainer",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "model": {"n_params": n_params, **model_config(args.tiny).to_diff_dict()},
        "environment": environment(device),
        "mfu_formula": "6 * n_params * useful_tokens / seconds / peak_flops"
        + (f", peak_flops = {peak:.3g}" if peak else " (no peak known for this device: null)"),
        "results": {},
    }
    out["config"]["out"] = str(args.out)
    print(
        f"device {out['environment'].get('gpu', device)}; model {n_params / 1e6:.1f}M params "
        f"{args.dtype}; {args.num_seqs} seqs/step, lengths {args.seq_len}, budget {args.budget}",
        flush=True,
    )
    table = variants_table()

    def over_budget(phase: str) -> bool:
        if time.perf_counter() - t_start <= args.time_budget:
            return False
        out["results"].setdefault(phase, {})["status"] = "skipped"
        out["results"][phase]["reason"] = f"--time-budget {args.time_budget:g} s exceeded"
        print(f"[{phase}] skipped: time budget exceeded", flush=True)
        return True

    # Non-flex variants, their correctness check (+ leak control), then flex (may compile
    # for minutes) and its check, which on CUDA reuses the training compile.
    order = [n for n in VARIANTS if n in args.variants]
    plain = [n for n in order if table[n].attn != "flex_attention"]
    flex = [n for n in order if table[n].attn == "flex_attention"]
    chk: dict = {}

    def train(name: str) -> None:
        if over_budget(name):
            return
        out["results"][name] = guarded(
            name,
            lambda: run_variant(name, table[name], model, opt, args, device, n_params, peak),
            model,
            device,
        )
        write(out, args, t_start)

    def check(names: list[str]) -> None:
        if not args.check_seqs or not names or over_budget("correctness"):
            return
        r = guarded(
            "correctness", lambda: correctness(model, args, device, names, chk), model, device
        )
        out["correctness"] = {**chk, **{k: v for k, v in r.items() if k not in chk}}
        write(out, args, t_start)

    for name in plain:
        train(name)
    check(plain + ["leak_control"])
    for name in flex:
        train(name)
        if name == "packed_flex" and out["results"].get(name, {}).get("status") == "error":
            if "packed_flex_static" not in flex:
                print("[packed_flex] failed; retrying with static shapes (packed_flex_static)")
                train("packed_flex_static")
    check([n for n in ("packed_flex", "packed_flex_static") if n in out["results"]])
    for ref in ("padded_hf", "padded_chunked"):  # the second in case the first OOMs
        base = out["results"].get(ref, {}).get("useful_tokens_per_s")
        for r in out["results"].values():
            if base and r.get("status") == "ok":
                r[f"ratio_vs_{ref}"] = r["useful_tokens_per_s"] / base
    write(out, args, t_start)
    print(markdown(out))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
