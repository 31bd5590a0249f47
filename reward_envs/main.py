"""``caravela env``: check an env against its own example items, or score one completion."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="caravela-envs")
    sub = parser.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    check = sub.add_parser("check", help="score the manifest's example items, compare")
    check.add_argument("env_dir", type=Path)
    score = sub.add_parser("score", help="score one completion")
    score.add_argument("env_dir", type=Path)
    score.add_argument("--prompt", required=True)
    score.add_argument("--completion", required=True)
    score.add_argument("--answer")
    return parser


def run(args: argparse.Namespace) -> int:
    from orchestrator.scoring import import_entry_point, score_one
    from reward_envs.manifest import load_manifest

    try:
        manifest = load_manifest(args.env_dir)
        fn = import_entry_point(args.env_dir, manifest)
    except ValueError as e:
        print(f"caravela env: {e}", file=sys.stderr)
        return 2
    if args.env_command == "score":
        fields = {} if args.answer is None else {"answer": args.answer}
        s = score_one(fn, args.prompt, args.completion, fields)
        print(s.value if s.error is None else f"error: {s.error}")
        return 0 if s.error is None else 1
    failures = 0
    for i, item in enumerate(manifest.examples):
        s = score_one(fn, item.prompt, item.completion, manifest.fields(item))
        ok = s.error is None and s.value == item.expected_score
        failures += not ok
        got = s.value if s.error is None else f"error: {s.error}"
        print(f"{'ok  ' if ok else 'FAIL'} example {i}: expected {item.expected_score}, got {got}")
    print(f"{manifest.name}: {len(manifest.examples) - failures}/{len(manifest.examples)} ok")
    return 1 if failures or not manifest.examples else 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
