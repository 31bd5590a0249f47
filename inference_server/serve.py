"""``caravela serve [MODEL_DIR]`` (or ``caravela-inference``): the OpenAI-compatible server on
one engine, standalone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.paths import TINY_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        default=TINY_MODEL,
        help="HF-format model directory (default: the shipped tiny model); `caravela serve` "
        "also takes a run directory (its final/ model, else its latest checkpoint) or a "
        "checkpoint (<run>/checkpoints/step-N), exported to a temporary directory",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address; the server has no auth, keep it on loopback",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["transformers", "vllm"], default="vllm")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--name", help="model name clients send (default: the directory name)")
    p.add_argument(
        "--prompt-format",
        choices=["plain", "chat"],
        default="plain",
        help="how /v1/completions encodes a prompt, as a run's [prompt] format: plain (BOS + "
        "text) or chat (the tokenizer's chat template, a user message)",
    )
    p.add_argument(
        "--system",
        default=None,
        help="as a run's [prompt] system: /v1/completions' system message (chat) or text put "
        "before each prompt (plain)",
    )


def build_engine(model_dir: Path, backend: str, dtype: str) -> tuple[Any, Any]:
    """An engine and its tokenizer; a bad model dir is a clear error before any load."""
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a HF model directory (no config.json)")
    if backend == "vllm":
        from inference_server.vllm_backend import VLLMEngine

        engine = VLLMEngine(model_dir, dtype=dtype)  # type: ignore[arg-type]
        return engine, engine.tokenizer
    from inference_server.transformers_backend import DirTransformersEngine

    hf = DirTransformersEngine(model_dir, dtype=dtype)
    return hf, hf.tokenizer


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from inference_server.openai_api import create_app

    if args.prompt_format == "chat" and (args.model_dir / "config.json").exists():
        # refused before an engine loads
        from transformers import AutoTokenizer

        from inference_server.tokens import check_prompt_format

        check_prompt_format(
            AutoTokenizer.from_pretrained(args.model_dir), args.prompt_format, args.model_dir
        )
    engine, tok = build_engine(args.model_dir, args.backend, args.dtype)
    name = args.name or args.model_dir.name
    print(
        f"serving {args.model_dir} as {name!r} ({args.backend}) on http://{args.host}:{args.port}/v1"
    )
    app = create_app(engine, tok, name, args.prompt_format, args.system)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
