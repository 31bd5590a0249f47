"""Entry point of the trainer component: validate and print the resolved ``trainer`` section.

The trainer runs inside ``caravela run`` today (single process); the Ray trainer group
started on trainer nodes is the orchestrator issue's work and will start here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caravela-trainer", description=__doc__)
    p.add_argument("config", nargs="?", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from orchestrator.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"caravela-trainer: {e}", file=sys.stderr)
        return 2
    print(cfg.trainer.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
