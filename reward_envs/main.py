"""``caravela env``: build, list, test and try reward environments.

    caravela env build [ENV ...] [--store DIR] [--offline] [--wheelhouse DIR]
    caravela env list  [--store DIR]
    caravela env test  ENV [--isolation process|venv]
    caravela env score ENV --input items.jsonl [--workers K] [--timeout S]
    caravela env serve [--state-dir DIR] [--store DIR] [--offline] [--wheelhouse DIR]
                       [--host 127.0.0.1] [--port 8100]

ENV is a built-in env's name (``arith``, ``math``, ``gsm8k``, ``format``, ``code``) or a
directory holding ``caravela-env.toml``. ``build`` with no ENV builds every
built-in. ``score`` prints one JSON object per input line: ``{"id", "score",
"error"}``; an input item is ``{"id", "prompt", "completion", "answer", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BUILTIN = Path(__file__).resolve().parent / "builtin"


def builtin_envs() -> list[Path]:
    return sorted(p.parent for p in BUILTIN.glob("*/caravela-env.toml"))


def resolve(ref: str) -> Path:
    """A built-in env's name or an env directory -> the env directory."""
    path = Path(ref)
    if (path / "caravela-env.toml").exists():
        return path
    if (BUILTIN / ref / "caravela-env.toml").exists():
        return BUILTIN / ref
    names = ", ".join(p.name for p in builtin_envs())
    raise ValueError(
        f"{ref!r} is neither a built-in env ({names}) nor a directory with caravela-env.toml"
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from reward_envs.api.server import add_build_options  # argparse only; no FastAPI

    parser = parser or argparse.ArgumentParser(prog="caravela-envs")
    sub = parser.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    b = sub.add_parser("build", help="build env venvs into the store (login node)")
    b.add_argument("envs", nargs="*", help="env names or dirs; none = every built-in")
    b.add_argument("--store", type=Path, help="env store (default $CARAVELA_ENV_STORE)")
    b.add_argument("--offline", action="store_true", help="no network: uv cache or wheelhouse")
    b.add_argument("--wheelhouse", type=Path, help="install only from this wheel directory")
    ls = sub.add_parser("list", help="built-in envs and what the store holds")
    ls.add_argument("--store", type=Path)
    t = sub.add_parser("test", help="score the env's own example items, report mismatches")
    t.add_argument("env")
    t.add_argument("--isolation", choices=["process", "venv"])
    t.add_argument("--store", type=Path)
    s = sub.add_parser("score", help="score items from a JSONL file, JSON lines out")
    s.add_argument("env")
    s.add_argument("--input", type=Path, required=True, help="JSONL items ('-' = stdin)")
    s.add_argument("--isolation", choices=["process", "venv"])
    s.add_argument("--store", type=Path)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--timeout", type=float, help="per-item seconds (default: the manifest's)")
    api = sub.add_parser("serve", help="the env registration REST API (bearer-token auth)")
    api.add_argument("--state-dir", type=Path, default=Path("env-api"), help="registry + token")
    add_build_options(api)
    api.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    api.add_argument("--port", type=int, default=8100)
    return parser


def _pool(args: argparse.Namespace, env_dir: Path, workers: int, timeout: float | None):
    from reward_envs.builder import prepare
    from reward_envs.manifest import load_manifest
    from reward_envs.pool import EnvPool

    manifest = load_manifest(env_dir)
    isolation = args.isolation or manifest.isolation
    built = prepare(env_dir, isolation, args.store)
    return manifest, EnvPool(manifest, built, workers=workers, timeout_s=timeout)


def _build(args: argparse.Namespace) -> int:
    from reward_envs.builder import build, default_store, find_built

    store = args.store or default_store()
    dirs = [resolve(e) for e in args.envs] or builtin_envs()
    for d in dirs:
        t0 = time.perf_counter()
        found = find_built(d, store)
        entry = found or build(d, store, offline=args.offline, wheelhouse=args.wheelhouse)
        how = "found" if found else f"built in {time.perf_counter() - t0:.1f} s"
        print(f"{entry.name}-{entry.build_hash}: {how} ({Path(entry.python).parent.parent})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from reward_envs.builder import default_store, find_built
    from reward_envs.manifest import load_manifest

    store = args.store or default_store()
    for d in builtin_envs():
        m = load_manifest(d)
        entry = find_built(d, store)
        state = f"built {entry.build_hash}" if entry else "not built"
        print(f"{m.name:10s} {m.version:8s} {state:24s} {', '.join(m.requirements) or '-'}")
    others = sorted(p.name for p in Path(store).glob("*-*") if (p / "build.json").exists())
    print(f"store {store}: {len(others)} builds" + (f" ({', '.join(others)})" if others else ""))
    return 0


def _test(args: argparse.Namespace) -> int:

    env_dir = resolve(args.env)
    manifest, pool = _pool(args, env_dir, workers=1, timeout=None)
    try:
        items = manifest.example_items()
        results = pool.score(items)
    finally:
        pool.close()
    failures = 0
    for i, (e, r) in enumerate(zip(manifest.examples, results, strict=True)):
        ok = r.error is None and r.score == e.expected_score
        failures += not ok
        got = r.score if r.error is None else f"error ({r.error_kind}): {r.error}"
        print(f"{'ok  ' if ok else 'FAIL'} example {i}: expected {e.expected_score}, got {got}")
    n = len(manifest.examples)
    print(f"{manifest.name}: {n - failures}/{n} ok (build {results[0].build_hash if n else '-'})")
    return 1 if failures or not n else 0


def _score(args: argparse.Namespace) -> int:
    from reward_envs.protocol import Item

    env_dir = resolve(args.env)
    src = sys.stdin if str(args.input) == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    ids, items = [], []
    with src:
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids.append(row.pop("id"))
                items.append(Item(row.pop("prompt"), row.pop("completion"), row))
            except (ValueError, KeyError, AttributeError) as e:
                raise ValueError(
                    f"{args.input}:{lineno}: an item is a JSON object with 'id', 'prompt' "
                    f"and 'completion' ({type(e).__name__}: {e})"
                ) from None
    _, pool = _pool(args, env_dir, workers=args.workers, timeout=args.timeout)
    try:
        results = pool.score(items)
    finally:
        pool.close()
    for i, r in zip(ids, results, strict=True):
        print(json.dumps({"id": i, "score": r.score, "error": r.error}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from reward_envs.api.server import serve_from

    serve_from(args)
    return 0


def run(args: argparse.Namespace) -> int:
    from reward_envs.builder import EnvBuildError
    from reward_envs.pool import EnvStartError

    commands = {"build": _build, "list": _list, "test": _test, "score": _score, "serve": _serve}
    try:
        return commands[args.env_command](args)
    except (ValueError, EnvBuildError, EnvStartError, NotImplementedError) as e:
        print(f"caravela env: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
