"""GPU acceptance: the project's own GPU code paths, each run once and recorded pass/fail.

Every check calls Caravela's classes (``TrainerRank``/``Trainer``, ``trainer.checkpoint``,
``DirTransformersEngine``, ``common.transfer.TransferGroup``), never a copy of them:

- ``fsdp2_mixed_precision``: a ``TrainerRank`` joins a real process group of one rank (its
  own backend: NCCL for CUDA tensors, gloo for CPU ones) and its ``Trainer`` shards the model
  with FSDP2 (``trainer.sharding = "fsdp2"``) under the mixed-precision policy
  (``trainer.dtype = "bfloat16"`` over ``trainer.master_dtype = "float32"``): float32 DTensor
  parameters, bfloat16 weights and inputs inside a decoder layer's forward.
- ``packed_train_step``: ``Trainer.train_step`` on packed rows (``trainer.layout = "packed"``)
  with ``attn_implementation = "flex_attention"``: untimed warm-up steps (flex compiles), then
  timed steps (seconds, tokens/s, peak memory); loss and gradient norm finite, weights moved,
  AdamW state float32.
- ``chunked_logprobs``: the policy's logprobs (forward and backward) of one micro-batch with
  ``trainer.logprob_chunk_size`` vs one chunk holding every row (the full logits): max |diff|
  and the extra peak memory of each.
- ``dcp_resume``: ``TrainerRank.save`` (torch.distributed.checkpoint), a new rank ``load``s it
  (model and optimizer state equal), then one more step on both: the weights and loss after
  it vs continuing directly (max |diff|, and relative to the step's own update).
- ``engine_generate``: ``DirTransformersEngine`` on the GPU takes the trained weights
  (``update_weights``, checksum equal to the trainer's), samples with logprobs (tokens/s) and
  passes the weight-sync probe against the trainer's logprobs (``PROBE_TOLERANCE``).
- ``weight_push`` (two processes, one GPU each; skipped with one GPU; ``acceptance_push.py``):
  ``TransferGroup`` rank 0 ``send``s the served weights, rank 1 ``receive``s them over NCCL;
  ``weights_checksum`` equal on both sides, seconds and GB/s per push.

A failing check records its error and the next one runs (checks that need an earlier one's
trainer say so). The model is a RANDOM Qwen2-0.5B shape (``bench/gpu_trainer.py``'s
``model_config``; ``--tiny``: its tiny shape), saved with a word-level tokenizer of exactly
its vocabulary (the shipped tiny model's tokenizer has 23 tokens, fewer than the model
samples). Results: ``bench/results/gpu_acceptance.json`` and ``.md`` (``--tiny``:
``gpu_acceptance_tiny.*``) on CUDA. ``--device cpu`` runs the same checks (gloo; sdpa where
this torch has no flex_attention backward on CPU, said in the output) and writes only to
``--out`` (default a temp dir), never to ``bench/results``: a CPU run is a code-path check.

Needs torch, transformers (+ its tokenizers, safetensors, numpy), triton for flex on CUDA,
and pydantic (the project's config and protocol classes): carry a pydantic wheel (and
pydantic-core, annotated-types, typing-inspection) to a GPU image that lacks it. No Ray,
vLLM or network.

NOT RUN ON A GPU YET (none was available where it was written): only the CPU run has passed,
so the CUDA-only lines (NCCL, flex compiles, CUDA memory numbers) are untried.

    python bench/gpu_acceptance.py                      # 1-2 GPUs; short (first flex compile)
    python bench/gpu_acceptance.py --tiny               # quick CUDA run, tiny model
    python bench/gpu_acceptance.py --device cpu --tiny --out /tmp/acc.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKS = (
    "fsdp2_mixed_precision",
    "packed_train_step",
    "chunked_logprobs",
    "dcp_resume",
    "engine_generate",
    "weight_push",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model and batches (quick run)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (.md next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    args = p.parse_args(argv)
    full = dict(num_seqs=32, seq_len=(128, 1024), prompt_len=(16, 256), budget=8192)
    full.update(row_tokens=8192, chunk=1024, warmup=2, steps=3, lr=1e-4, warmup_steps=10)
    full.update(prompts=8, samples=4, new_tokens=128, pushes=3, bucket_mb=256.0)
    tiny = dict(num_seqs=8, seq_len=(16, 96), prompt_len=(4, 16), budget=256, row_tokens=256)
    tiny.update(chunk=32, warmup=1, steps=2, prompts=4, samples=2, new_tokens=16, pushes=2)
    tiny.update(bucket_mb=0.05)
    for k, v in {**full, **(tiny if args.tiny else {})}.items():
        setattr(args, k, v)
    results = REPO / "bench" / "results"
    if args.out is None:
        name = "gpu_acceptance" + ("_tiny" if args.tiny else "")
        cpu = Path(tempfile.mkdtemp(prefix="gpu-acceptance-")) / f"{name}_cpu.json"
        args.out = results / f"{name}.json" if args.device == "cuda" else cpu
    if args.device == "cpu" and results in args.out.resolve().parents:
        p.error(
            "--device cpu: --out must be outside bench/results (a CPU run checks the code "
            "paths, it is no GPU result)"
        )
    return args


# a wrong flag fails before torch is imported (spawned push ranks import this as
# __mp_main__ and parse nothing)
ARGS = parse_args() if __name__ == "__main__" else None

# bench/gpu_trainer.py and gpu_report.py (model, batches, environment) import transformers:
# imported where used, so the spawned push ranks start with torch alone
import torch  # noqa: E402
from acceptance_push import free_port, push  # noqa: E402  (bench/)

from common.weights import weights_checksum  # noqa: E402
from inference_server.protocol import GenerateRequest, SamplingParams  # noqa: E402
from inference_server.transformers_backend import DirTransformersEngine  # noqa: E402
from inference_server.weights import PROBE_TOLERANCE  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.group import TrainerRank  # noqa: E402
from trainer.protocol import TrainBatch, TrainSample  # noqa: E402

# --------------------------------------------------------------------------- set-up


def save_model(args: argparse.Namespace, device: torch.device, path: Path) -> Path:
    """The random model (float32, the master dtype) and a tokenizer of its vocabulary."""
    from gpu_trainer import build_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = argparse.Namespace(seed=args.seed, tiny=args.tiny, dtype="float32")
    model = build_model(spec, device)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, model.config.vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(path)
    return path


def flex_missing(device: torch.device) -> str | None:
    """Why flex_attention cannot train on ``device`` in this torch (None: it can). Only CPU
    is asked: on CUDA a flex failure is a failed check, never a fallback."""
    if device.type != "cpu":
        return None
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as e:
        return f"torch {torch.__version__}: {e}"
    return None


def batch(args: argparse.Namespace, index: int, vocab: int) -> TrainBatch:
    """A GRPO-shaped batch of random token sequences (``gpu_trainer.make_step``)."""
    from gpu_trainer import make_step

    seqs, adv = make_step(index, args, vocab)
    samples = [
        TrainSample(sample_id=f"{index}-{i}", prompt_ids=p, completion_ids=c, advantage=a)
        for i, ((p, c), a) in enumerate(zip(seqs, adv, strict=True))
    ]
    return TrainBatch(step=index, samples=samples, max_completion_length=args.seq_len[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def whole(t: Any) -> Any:
    """A DTensor gathered (world 1: the local tensor), a tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, whole, by dotted path."""
    if isinstance(state, dict):
        return {k: v for key, s in state.items() for k, v in tensors(s, f"{prefix}{key}.").items()}
    if isinstance(state, list | tuple):
        return {k: v for i, s in enumerate(state) for k, v in tensors(s, f"{prefix}{i}.").items()}
    return {prefix[:-1]: whole(state)} if isinstance(state, torch.Tensor) else {}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- checks


class Acceptance:
    """The checks, in order, sharing one trainer rank (``fsdp2_mixed_precision`` builds it)."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, attn: str) -> None:
        self.args, self.model_dir = args, model_dir
        self.device = torch.device(args.device)
        self.cfg = TrainerConfig(
            lr=args.lr,
            warmup_steps=args.warmup_steps,  # the LR still rising: the scheduler state matters
            layout="packed",
            attn_implementation=attn,
            dtype="bfloat16",
            master_dtype="float32",
            sharding="fsdp2",
            logprob_chunk_size=args.chunk,
            max_tokens_per_micro_batch=args.budget,
            pack_row_tokens=args.row_tokens,
            cpus_per_rank=args.threads,
            seed=args.seed,
        )
        self.vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        self.rank: Any = None

    def trainer(self) -> Any:
        if self.rank is None:
            raise RuntimeError("no trainer: fsdp2_mixed_precision, which builds it, failed")
        return self.rank.trainer

    def fsdp2_mixed_precision(self) -> dict:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        self.rank = TrainerRank(self.model_dir, self.cfg, rank=0, world=1)
        self.rank.join("127.0.0.1", free_port())
        t = self.trainer()
        # before any forward: FSDP2's root keeps its parameters unsharded after one
        params = list(t.model.parameters())
        seen: dict[str, str] = {}
        layer = t.model.model.layers[0].mlp.down_proj
        hook = layer.register_forward_pre_hook(
            lambda m, a: seen.update(weight=str(m.weight.dtype), input=str(a[0].dtype))
        )
        try:  # one pass with a zero loss, as the trainer's idle passes (flex compiles here)
            logps, _ = t.policy(t.layout(batch(self.args, 0, self.vocab), [0])[0])
            (logps.sum() * 0.0).backward()
        finally:
            hook.remove()
            t.optimizer.zero_grad(set_to_none=True)
        backend = str(dist.get_backend())
        res = {
            "backend": backend,
            "world": dist.get_world_size(),
            "sharded": t.sharded,
            "dtensor_params": sum(isinstance(p, DTensor) for p in params),
            "params": len(params),
            "n_params": sum(p.numel() for p in params),
            "master_dtypes": sorted({str(p.dtype) for p in params}),
            "forward_weight_dtype": seen.get("weight"),
            "forward_input_dtype": seen.get("input"),
            "logprobs_finite": bool(torch.isfinite(logps).all()),
        }
        res["passed"] = (
            t.sharded
            and res["dtensor_params"] == len(params)
            and res["master_dtypes"] == ["torch.float32"]
            and seen.get("weight") == seen.get("input") == "torch.bfloat16"
            and res["logprobs_finite"]
            and ("nccl" in backend if self.device.type == "cuda" else backend == "gloo")
        )
        return res

    def packed_train_step(self) -> dict:
        t, args = self.trainer(), self.args
        before = {k: v.detach().clone() for k, v in t.state_dict(master=True).items()}
        warm = []
        for w in range(args.warmup):  # flex compiles here (static shape, then dynamic)
            t0 = time.perf_counter()
            t.train_step(batch(args, 1000 + w, self.vocab))
            sync(self.device)
            warm.append(time.perf_counter() - t0)
            print(f"[packed_train_step] warm-up step {w}: {warm[-1]:.1f} s", flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = []
        for s in range(args.steps):
            b = batch(args, 1 + s, self.vocab)
            sync(self.device)
            t0 = time.perf_counter()
            m = t.train_step(b)
            sync(self.device)
            m["seconds"] = time.perf_counter() - t0
            m["completion_tokens"] = sum(len(x.completion_ids) for x in b.samples)
            steps.append(m)
            print(f"[packed_train_step] step {s}: {m['seconds']:.2f} s", flush=True)
        after = t.state_dict(master=True)
        secs = sum(m["seconds"] for m in steps)
        adam = [v for k, v in tensors(t.optimizer.state_dict()).items() if "exp_avg" in k]
        res = {
            "attn": self.cfg.attn_implementation,
            "warmup_seconds": warm,
            "seconds_per_step": secs / len(steps),
            "tokens_per_s": sum(m["tokens"] for m in steps) / secs,
            "completion_tokens_per_s": sum(m["completion_tokens"] for m in steps) / secs,
            "tokens_per_step": sum(m["tokens"] for m in steps) / len(steps),
            "micro_batches_per_step": sum(m["micro_batches"] for m in steps) / len(steps),
            "padding_frac": sum(m["padding_frac"] for m in steps) / len(steps),
            "loss": [m["loss"] for m in steps],
            "grad_norm": [m["grad_norm"] for m in steps],
            "max_weight_change": max_diff(before, after),
            "adam_state_dtypes": sorted({str(v.dtype) for v in adam}),
            "version": t.version,
        }
        if self.device.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["passed"] = (
            all(math.isfinite(x) for x in res["loss"] + res["grad_norm"])
            and res["max_weight_change"] > 0
            and res["adam_state_dtypes"] == ["torch.float32"]
        )
        return res

    def chunked_logprobs(self) -> dict:
        t = self.trainer()
        mb = t.layout(batch(self.args, 1, self.vocab))[0]
        res: dict[str, Any] = {"tokens": len(mb.target_ids), "chunk": self.cfg.logprob_chunk_size}
        # forward and backward (of a zero loss) as in training, the gradients dropped after
        # each: the extra peak is what the logprob path costs a training pass (same
        # activations in both)
        out = {}
        for name, chunk in (("chunked", self.cfg.logprob_chunk_size), ("full", len(mb.target_ids))):
            t.policy.chunk_size = chunk
            sync(self.device)
            base = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                logps, _ = t.policy(mb)
                out[name] = logps.detach().float()
                (logps.sum() * 0.0).backward()
            finally:
                t.policy.chunk_size = self.cfg.logprob_chunk_size
                t.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                res[f"{name}_extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            del logps
        diff = (out["chunked"] - out["full"]).abs()
        res.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
        res["tolerance"] = 2e-2  # bf16 logits: GEMMs of other shapes may round 1 ulp apart
        res["passed"] = bool(torch.isfinite(out["full"]).all()) and res["max_abs_diff"] <= 2e-2
        return res

    def dcp_resume(self) -> dict:
        a, args = self.trainer(), self.args
        path = self.model_dir.parent / "checkpoint"
        path.mkdir()
        saved = {k: v.detach().clone() for k, v in tensors(a.checkpoint()).items()}
        saved_version = a.version
        t0 = time.perf_counter()
        self.rank.save(str(path))
        sync(self.device)
        res: dict[str, Any] = {"save_seconds": time.perf_counter() - t0}
        res["checkpoint_gib"] = (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
        )
        nxt = batch(args, 500, self.vocab)
        loss_a = a.train_step(nxt)["loss"]
        weights_a = {k: v.detach().clone() for k, v in a.state_dict(master=True).items()}
        other = TrainerRank(self.model_dir, self.cfg, rank=0, world=1)
        other.alone()  # the process group exists: its Trainer shards with FSDP2 too
        try:
            t0 = time.perf_counter()
            version = other.load(str(path))
            sync(self.device)
            res["load_seconds"] = time.perf_counter() - t0
            loaded = tensors(other.trainer.checkpoint())
            res["restored_max_diff"] = max_diff(saved, loaded)
            res["restored_version"], res["saved_version"] = version, saved_version
            loss_b = other.trainer.train_step(nxt)["loss"]
            weights_b = other.trainer.state_dict(master=True)
            # the step's own update: how far continuing moved the weights from the checkpoint
            start = {k.removeprefix("model."): v for k, v in saved.items() if k[:6] == "model."}
            update = max(float((w - start[k]).abs().max()) for k, w in weights_a.items())
            res["next_step_weights_max_diff"] = max_diff(weights_a, weights_b)
            res["next_step_update_max"] = update
            res["next_step_loss"], res["next_step_loss_diff"] = loss_a, abs(loss_a - loss_b)
        finally:
            del other
        res["passed"] = (
            res["restored_max_diff"] == 0.0
            and res["restored_version"] == res["saved_version"]
            and res["next_step_loss_diff"] <= 1e-4 * abs(loss_a) + 1e-6
            # bit-exact where kernels are deterministic; a lost optimizer or scheduler state
            # moves the step by a good part of its own update
            and res["next_step_weights_max_diff"] <= 1e-2 * res["next_step_update_max"]
        )
        return res

    def engine_generate(self) -> dict:
        args, t = self.args, self.trainer()
        engine = DirTransformersEngine(self.model_dir, dtype=self.cfg.dtype, seed=args.seed)
        res: dict[str, Any] = {"engine_device": str(engine.model.device)}
        state = t.state_dict()  # the compute dtype, what engines serve
        served = {n: state[n] for n in engine.shapes}
        engine.update_weights(1, served)
        res["checksum_equal"] = engine.checksum() == weights_checksum(served)
        seqs = [s.prompt_ids for s in batch(args, 7, self.vocab).samples]
        params = SamplingParams(n=args.samples, max_tokens=args.new_tokens, seed=args.seed)
        requests = [
            GenerateRequest(request_id=f"p{i}", prompt_ids=p[:64], sampling=params)
            for i, p in enumerate(seqs[: args.prompts])
        ]
        warm = params.model_copy(update={"max_tokens": 4, "n": 1})
        engine.generate([requests[0].model_copy(update={"sampling": warm})])
        sync(self.device)
        t0 = time.perf_counter()
        results = engine.generate(requests)
        sync(self.device)
        secs = time.perf_counter() - t0
        done = [(r, c) for r in results for c in r.completions]
        tokens = sum(len(c.token_ids) for _, c in done)
        logps = [lp for _, c in done for lp in c.logprobs]
        res.update(
            completions=len(done),
            tokens=tokens,
            generate_seconds=secs,
            tokens_per_s=tokens / secs,
            logprobs_per_token=len(logps) == tokens,
            logprobs_valid=all(math.isfinite(x) and x <= 1e-6 for x in logps),
            mean_logprob=sum(logps) / max(1, len(logps)),
        )
        prompts = {r.request_id: r.prompt_ids for r in requests}
        probe = [prompts[r.request_id] + c.token_ids for r, c in done[:4]]
        res["probe_tolerance"] = PROBE_TOLERANCE[self.cfg.dtype]
        res["probe_mean_diff"] = engine.probe(
            probe, self.rank.logprobs(probe), res["probe_tolerance"]
        )  # raises past the tolerance
        del engine
        res["passed"] = (
            res["engine_device"].startswith(self.device.type)
            and res["checksum_equal"]
            and tokens > 0
            and res["logprobs_per_token"]
            and res["logprobs_valid"]
        )
        return res

    def weight_push(self) -> dict:
        if self.device.type == "cuda" and torch.cuda.device_count() < 2:
            return {"status": "skipped", "reason": "needs 2 GPUs, found 1"}
        self.rank = None  # free the trainer's memory first
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        bucket = int(self.args.bucket_mb * 2**20)
        return push(self.model_dir, self.args.device, bucket, self.args.pushes, self.args.threads)


# --------------------------------------------------------------------------- running


def guarded(name: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one check; an OOM or any other error becomes its recorded status (the pattern
    of ``gpu_trainer.guarded``), so the next check still runs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        res = fn()
        if "status" not in res:
            res["status"] = "passed" if res.pop("passed") else "failed"
    except torch.cuda.OutOfMemoryError as e:
        res = {"status": "OOM", "error": str(e).splitlines()[0][:400]}
    except Exception as e:  # noqa: BLE001 - a failed check must not stop the others
        res = {
            "status": "error",
            "error": f"{type(e).__name__}: {str(e)[:600]}",
            "traceback": traceback.format_exc()[-3000:],
        }
    res["check_seconds"] = time.perf_counter() - t0
    if device.type == "cuda" and "peak_mem_gib" not in res:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"[{name}] {res['status']}: {res.get('error') or res.get('reason') or ''}", flush=True)
    return res


def markdown(out: dict) -> str:
    env, c = out["environment"], out["config"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads; a code-path check)"
    lines = [
        "# gpu_acceptance" + (" (tiny)" if c["tiny"] else ""),
        "",
        f"{where}, {env.get('gpus', 0)} GPU(s), torch {env['torch']}, transformers "
        f"{env['transformers']}, triton {env.get('triton')}. Random Qwen2 "
        f"{'tiny' if c['tiny'] else '0.5B'} shape, {out['attention']['used']} attention"
        + (f" ({out['attention']['note']})" if out["attention"].get("note") else "")
        + f". Wall {out.get('wall_seconds', 0):.0f} s.",
        "",
        "| check | status | numbers |",
        "|---|---|---|",
    ]
    skip = {"status", "traceback", "error", "reason", "loss", "grad_norm", "warmup_seconds"}
    for name, r in out["checks"].items():
        nums = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k not in skip and not isinstance(v, list | dict)
        )
        why = r.get("error") or r.get("reason")
        lines.append(f"| {name} | {r['status']} | {nums}{f'; {why}' if why else ''} |")
    return "\n".join(lines) + "\n"


def write(out: dict, path: Path, t_start: float) -> None:
    out["wall_seconds"] = time.perf_counter() - t_start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(out))


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu --tiny --out ...")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    missing = flex_missing(device)
    attention = {"requested": "flex_attention", "used": "sdpa" if missing else "flex_attention"}
    if missing:
        attention["note"] = f"flex_attention cannot train on CPU here, sdpa instead: {missing}"
        print(f"[attention] {attention['note']}", flush=True)
    from gpu_report import environment

    env = environment(device)
    env["gpus"] = torch.cuda.device_count() if device.type == "cuda" else 0
    out: dict[str, Any] = {
        "benchmark": "gpu_acceptance",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "attention": attention,
        "checks": {},
    }
    with tempfile.TemporaryDirectory(prefix="caravela-acceptance-") as tmp:
        t0 = time.perf_counter()
        model_dir = save_model(args, device, Path(tmp) / "model")
        out["model_seconds"] = time.perf_counter() - t0
        acc = Acceptance(args, model_dir, attention["used"])
        for name in CHECKS:
            out["checks"][name] = guarded(name, getattr(acc, name), device)
            write(out, args.out, t_start)
        acc.rank = None
    failed = [n for n, r in out["checks"].items() if r["status"] not in ("passed", "skipped")]
    out["passed"] = not failed
    write(out, args.out, t_start)
    print(markdown(out))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS or parse_args()))
