"""Generation throughput, vLLM vs transformers backend, and weight-update latency vs size.

Run: ``.venv/bin/python bench/generation.py`` (CPU here; ~5 min). Writes
``bench/results/generation.json`` and ``.md``.

Models: the shipped tiny model (1.05M params) and random Llama models of the same
architecture at ~20M and ~100M parameters (saved as HF dirs in a temp folder; random
weights, so completions are noise, but the token counts are real). Workload: 64
prompts x group size 8, up to 32 new tokens, T = 1; tokens/s = completion tokens
produced / wall seconds, after one warm-up call per backend. Weight updates: the full
state dict pushed to the vLLM engine as one 256 MiB-bucketed transfer vs one tensor
per bucket (per-tensor), median of 3, after a warm-up update.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.paths import TINY_HELDOUT, TINY_MODEL  # noqa: E402
from inference_server.protocol import GenerateRequest, SamplingParams  # noqa: E402
from inference_server.tokens import encode_prompts  # noqa: E402
from inference_server.transformers_backend import TransformersEngine  # noqa: E402
from inference_server.vllm_backend import VLLMEngine  # noqa: E402

SHAPES = {  # name: (hidden, layers, heads, intermediate)
    "random-20M": (384, 8, 6, 1536),
    "random-100M": (768, 12, 12, 3072),
}


def make_random(dirpath: Path, shape: tuple[int, int, int, int]) -> int:
    tiny = json.loads((TINY_MODEL / "config.json").read_text())
    hidden, layers, heads, inter = shape
    cfg = LlamaConfig(
        vocab_size=tiny["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny.get("pad_token_id"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dirpath)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(dirpath)
    return sum(p.numel() for p in model.parameters())


def requests(tok) -> list[GenerateRequest]:
    rows = [json.loads(x) for x in TINY_HELDOUT.read_text().splitlines()[:64]]
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=32, seed=0)
    prompt_ids = encode_prompts(tok, [r["prompt"] for r in rows])
    return [
        GenerateRequest(request_id=r["id"], prompt_ids=ids, sampling=sp)
        for r, ids in zip(rows, prompt_ids, strict=True)
    ]


def tokens_per_s(engine, reqs) -> float:
    engine.generate(reqs[:8])  # warm-up
    t0 = time.perf_counter()
    res = engine.generate(reqs)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for r in res for c in r.completions) / dt


def update_seconds(engine, state, bucket_bytes, version) -> tuple[float, int]:
    times = []
    for _ in range(3):
        version += 1
        t0 = time.perf_counter()
        engine.update_weights(version, state, bucket_bytes=bucket_bytes)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), version


def main() -> None:
    torch.set_num_threads(2)
    out: dict = {"workload": "64 prompts x 8 samples, <=32 new tokens, T=1", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-1M": (TINY_MODEL, None)}
        for name, shape in SHAPES.items():
            d = Path(tmp) / name
            models[name] = (d, make_random(d, shape))
        for name, (path, _) in models.items():
            tok = AutoTokenizer.from_pretrained(path)
            hf_model = AutoModelForCausalLM.from_pretrained(path)
            n_params = sum(p.numel() for p in hf_model.parameters())
            reqs = requests(tok)
            hf = tokens_per_s(TransformersEngine(hf_model, tok), reqs)
            engine = VLLMEngine(path, max_model_len=128)
            vl = tokens_per_s(engine, reqs)
            state = {k: v for k, v in hf_model.state_dict().items() if k in engine.shapes}
            _, version = update_seconds(engine, state, 256 << 20, 0)  # warm-up
            bucketed, version = update_seconds(engine, state, 256 << 20, version)
            per_tensor, version = update_seconds(engine, state, 1, version)
            engine.shutdown()
            out["models"][name] = {
                "params": n_params,
                "hf_tokens_per_s": round(hf),
                "vllm_tokens_per_s": round(vl),
                "vllm_over_hf": round(vl / hf, 2),
                "update_bucketed_s": round(bucketed, 4),
                "update_per_tensor_s": round(per_tensor, 4),
                "weights_mb": round(
                    sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 1
                ),
            }
            print(name, out["models"][name], flush=True)
    res = REPO / "bench" / "results"
    (res / "generation.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# generation",
        "",
        out["workload"] + "; CPU, 2 threads, fp32.",
        "",
        "| model | params | HF tok/s | vLLM tok/s | vLLM/HF | update bucketed s "
        "| update per-tensor s | weights MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in out["models"].items():
        lines.append(
            f"| {name} | {m['params'] / 1e6:.1f}M | {m['hf_tokens_per_s']} | "
            f"{m['vllm_tokens_per_s']} | {m['vllm_over_hf']} | {m['update_bucketed_s']} | "
            f"{m['update_per_tensor_s']} | {m['weights_mb']} |"
        )
    (res / "generation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
