"""Entry point of the orchestrator component: the driver (``caravela run``)."""

from __future__ import annotations

import sys

from orchestrator.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
