"""Entry point of the inference component: ``caravela-inference``, the OpenAI-compatible server.

``caravela-inference [MODEL_DIR] [--backend transformers|vllm] [--host 127.0.0.1 --port 8000]``
is ``caravela serve`` under the component's own name (same arguments, same server:
``inference_server/serve.py``). Inside a training run the engines are Ray actors started
by the orchestrator instead.
"""

from __future__ import annotations

import argparse
import sys

from inference_server.serve import add_arguments, serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="caravela-inference", description="OpenAI-compatible HTTP server on a model dir."
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return serve(args)
    except (FileNotFoundError, ValueError) as e:  # ValueError: e.g. --prompt-format chat
        print(f"caravela-inference: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
