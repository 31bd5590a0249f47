"""Entry point of the inference component: sample completions from a model directory.

``caravela-inference MODEL_DIR --prompt "Q: 1+2+3 A: " -n 4`` prints each completion with
its finish reason and summed logprob (the transformers backend; vLLM and the HTTP server
arrive with the inference-server issue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caravela-inference", description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("-n", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from pydantic import ValidationError

    from inference_server.protocol import GenerateRequest, SamplingParams

    try:
        sampling = SamplingParams(
            n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
        )
    except ValidationError as e:
        print(f"caravela-inference: {e}", file=sys.stderr)
        return 2
    if not (args.model_dir / "config.json").exists():
        print(f"caravela-inference: {args.model_dir} has no config.json", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_server.tokens import encode_prompts
    from inference_server.transformers_backend import TransformersEngine

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(args.model_dir), tok)
    requests = [
        GenerateRequest(request_id=str(i), prompt_ids=ids, sampling=sampling)
        for i, ids in enumerate(encode_prompts(tok, args.prompt))
    ]
    for req, res in zip(requests, engine.generate(requests), strict=True):
        for c in res.completions:
            print(f"[{req.request_id}] {c.finish_reason:6s} {sum(c.logprobs):8.3f}  {c.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
