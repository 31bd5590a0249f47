"""The ``caravela`` command: one umbrella CLI whose subcommands start each job.

Arguments and the config are parsed and validated before torch, vLLM or Ray is
imported, so a typo fails in milliseconds with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path, help="TOML config (default: embedded demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.lr=1e-5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caravela", description="Distributed RLVR/GRPO training on SLURM + Ray clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="train: evaluate, GRPO steps, evaluate again")
    _add_config_args(run)
    run.add_argument("--address", help="join this Ray cluster (host:port) instead of a local one")
    run.add_argument("--token", type=Path, help="that cluster's Ray auth token file")
    start = run.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its latest checkpoint",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the previous run in output_dir first (a run refuses it otherwise)",
    )
    cfg = sub.add_parser("config", help="validate a config and print it fully resolved")
    _add_config_args(cfg)
    ev = sub.add_parser(
        "eval",
        help="greedy / pass@1 / pass@k of `model` (a model, run or checkpoint dir), held out",
    )
    _add_config_args(ev)
    export = sub.add_parser(
        "export", help="a run's checkpoint as an HF model dir (config, safetensors, tokenizer)"
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run (or checkpoint) dir")
    export.add_argument("--step", type=int, help="the checkpoint of this step (default: latest)")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new HF model directory")
    samples = sub.add_parser(
        "samples", help="a run's samples log: every completion of a step, scored or errored"
    )
    samples.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    samples.add_argument("--step", type=int, help="this step's samples (default: the last)")
    samples.add_argument("--env", help="only the samples this env scored")
    samples.add_argument("--json", action="store_true", help="JSON lines, as logged")
    data = sub.add_parser("data", help="pre-tokenize a run's datasets (on the login node)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare = data_sub.add_parser(
        "prepare", help="tokenize every dataset (and the held-out sets) into the prepared store"
    )
    _add_config_args(prepare)
    from orchestrator.prepare import add_arguments as prepare_arguments

    prepare_arguments(prepare)
    from reward_envs.main import build_parser as env_parser

    env_parser(sub.add_parser("env", help="build, list, test or try reward environments"))
    from inference_server.serve import add_arguments

    add_arguments(
        sub.add_parser(
            "serve", help="OpenAI-compatible HTTP server on a model, run or checkpoint directory"
        )
    )
    from slurm.render import add_arguments as slurm_arguments

    slurm_arguments(sub.add_parser("slurm", help="render or submit the sbatch script of a run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        return _export(args)
    if args.command == "samples":
        return _samples(args)
    if args.command == "slurm":
        from orchestrator.launch import main as slurm_main

        return slurm_main(args)
    if args.command == "env":
        from reward_envs.main import run as env_run

        return env_run(args)
    from orchestrator.config import ConfigError, load_config

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"cluster.address='{args.address}'")
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if getattr(args, "token", None):
        overrides.append(f"cluster.token_path='{args.token}'")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"caravela {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(cfg.model_dump_json(indent=2))
        return 0
    if args.command == "data":
        from orchestrator.prepare import main as data_main

        try:
            return data_main(cfg, args)
        except (FileNotFoundError, ValueError) as e:
            print(f"caravela data {args.data_command}: {e}", file=sys.stderr)
            return 1
    from orchestrator.cluster import ClusterError
    from orchestrator.loop import evaluate_only, run

    try:
        if args.command == "eval":
            evaluate_only(cfg)
        else:
            run(cfg, overwrite=args.overwrite)
    except (FileNotFoundError, NotImplementedError, ValueError, ClusterError) as e:
        print(f"caravela {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``caravela serve``: a run or checkpoint directory is exported to a temporary HF model
    directory first (``orchestrator.export.served_model``)."""
    import signal

    from inference_server.serve import serve
    from orchestrator.export import served_model

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn hands SIGTERM back to this handler once it has shut down: the exit then runs
    # through served_model, which removes its temporary export (the default handler would not)
    signal.signal(signal.SIGTERM, stop)
    try:
        with served_model(args.model_dir) as model_dir:
            name = args.name or args.model_dir.resolve().name
            return serve(argparse.Namespace(**{**vars(args), "model_dir": model_dir, "name": name}))
    except (FileNotFoundError, ValueError) as e:
        print(f"caravela serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the same, for Ctrl-C
        return 130


def _samples(args: argparse.Namespace) -> int:
    """``caravela samples RUN_DIR [--step N] [--env E] [--json]``."""
    import json

    from orchestrator.samples import DIR, describe, last_step, read

    step = args.step if args.step is not None else last_step(args.run_dir)
    if step is None:
        print(
            f"caravela samples: no samples in {args.run_dir / DIR} (no step finished yet, "
            "or the run had logging.samples = false)",
            file=sys.stderr,
        )
        return 1
    found = 0
    for rec in read(args.run_dir, step, args.env):
        print(json.dumps(rec, ensure_ascii=False) if args.json else describe(rec))
        found += 1
    if not found:
        env = f" scored by env {args.env!r}" if args.env else ""
        print(
            f"caravela samples: no samples of step {step}{env} in {args.run_dir / DIR} (the "
            f"last step logged is {last_step(args.run_dir)}; segments past "
            "logging.samples_max_mb are deleted)",
            file=sys.stderr,
        )
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    """``caravela export RUN_DIR [--step N] OUT_DIR``."""
    out = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"caravela export: {out} exists and is not empty: name a new one", file=sys.stderr)
        return 2
    from orchestrator.export import export_checkpoint, find_checkpoint, is_checkpoint

    try:
        if is_checkpoint(args.run_dir):
            if args.step is not None:
                raise ValueError(f"{args.run_dir} is one checkpoint: --step applies to a run dir")
            ckpt = args.run_dir
        else:
            ckpt = find_checkpoint(args.run_dir, args.step)
        export_checkpoint(ckpt, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"caravela export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
