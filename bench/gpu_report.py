"""Reporting for ``bench/gpu_trainer.py``: environment, peak FLOPs, JSON + markdown output."""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}
PEAK_BF16_PCIE = {"H100": 756e12}


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_mem_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def peak_flops_for(device: torch.device, args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda" or args.dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    table = PEAK_BF16_PCIE if "PCIe" in name else PEAK_BF16
    return next((v for k, v in table.items() if k in name), None)


def write(out: dict, args: argparse.Namespace, t_start: float) -> None:
    out["wall_seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(out))


def markdown(out: dict) -> str:
    c, env = out["config"], out["environment"]
    dev = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    lines = [
        "# gpu_trainer" + (" (tiny)" if c["tiny"] else ""),
        "",
        f"{dev}, torch {env['torch']}, transformers {env['transformers']}, triton "
        f"{env.get('triton')}. Random Qwen2 {'tiny' if c['tiny'] else '0.5B'} shape, "
        f"{out['model']['n_params'] / 1e6:.1f}M params, {c['dtype']}. {c['num_seqs']} "
        f"sequences/step, lengths uniform {c['seq_len'][0]}-{c['seq_len'][1]}, budget "
        f"{c['budget']} tokens/micro-batch, {c['warmup']} warm-up + {c['steps']} timed steps.",
        f"MFU = {out['mfu_formula']}.",
        "",
        "| variant | attn | status | useful tok/s | s/step | MFU | peak mem GiB | padding "
        "| ratio vs padded_hf | ratio vs padded_chunked |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for name, r in out["results"].items():
        lines.append(
            f"| {name} | {r.get('attn', '-')} | {r.get('status', '-')} | "
            f"{f(r.get('useful_tokens_per_s'), '.0f')} | {f(r.get('seconds_per_step'), '.2f')} | "
            f"{f(r.get('mfu'), '.1%')} | {f(r.get('peak_mem_gib'), '.1f')} | "
            f"{f(r.get('padding_frac'), '.1%')} | {f(r.get('ratio_vs_padded_hf'), '.2f')} | "
            f"{f(r.get('ratio_vs_padded_chunked'), '.2f')} |"
        )
    for name, r in out["results"].items():
        if r.get("status") in ("skipped", "OOM", "error"):
            lines.append(f"\n{name}: {r['status']}: {r.get('reason') or r.get('error')}")
    chk = out.get("correctness")
    if chk:
        lines += [
            "",
            f"Correctness: {chk.get('sequences')} sequences, per-token completion logprobs vs "
            "each sequence alone (sdpa, full logits).",
            "",
            "| layout | attn | max abs diff | mean abs diff |",
            "|---|---|---:|---:|",
        ]
        for name, r in chk.items():
            if isinstance(r, dict):
                if "error" in r:
                    lines.append(f"| {name} | {r.get('attn')} | error: {r['error'][:80]} | |")
                else:
                    lines.append(
                        f"| {name} | {r['attn']} | {r['max_abs_diff']:.4g} | "
                        f"{r['mean_abs_diff']:.4g} |"
                    )
        if chk.get("status") in ("OOM", "error", "skipped"):
            lines.append(f"\ncorrectness: {chk['status']}: {chk.get('error') or chk.get('reason')}")
    return "\n".join(lines) + "\n"
