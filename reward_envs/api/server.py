"""Runs the env API with uvicorn: ``python -m reward_envs.api.server --state-dir DIR``.

Binds 127.0.0.1 unless told otherwise; every route but ``/health`` needs the bearer token
the server writes to ``<state_dir>/api-token`` (mode 0600) at start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def serve(
    host: str = "127.0.0.1", port: int = 8000, state_dir: Path = Path("env-api"), **settings: object
) -> None:
    """Serve until interrupted; ``settings`` are further ``ApiSettings`` fields (``store``,
    ``offline``, ``wheelhouse``, ``requirements``)."""
    import uvicorn

    from .main import create_app
    from .settings import ApiSettings

    config = ApiSettings.model_validate({"state_dir": Path(state_dir), **settings})
    app = create_app(config)
    print(f"env API on http://{host}:{port}; bearer token in {config.token_file}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caravela-env-api", description=__doc__)
    p.add_argument("--state-dir", type=Path, required=True, help="registry, token, inline envs")
    add_build_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    serve_from(p.parse_args(argv))
    return 0


def add_build_options(p: argparse.ArgumentParser) -> None:
    """Where and how the API builds the envs it registers (``caravela-env-api`` and
    ``caravela env serve`` alike)."""
    p.add_argument("--store", type=Path, help="env build store (default $CARAVELA_ENV_STORE)")
    p.add_argument("--offline", action="store_true", help="build venvs with no network")
    p.add_argument("--wheelhouse", type=Path, help="build venvs only from this wheel directory")
    p.add_argument("--index-url", help="the package index venvs build from (default PyPI)")
    p.add_argument(
        "--allow-index-url",
        action="append",
        default=[],
        metavar="URL",
        help="an index URL envs' requirement files may name (repeatable; default none)",
    )
    p.add_argument(
        "--allow-find-links",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a directory envs' requirement files may name with --find-links (repeatable)",
    )
    p.add_argument(
        "--allow-includes",
        action="store_true",
        help="let envs' requirement files include (-r/-c) files in the env directory",
    )


def serve_from(args: argparse.Namespace) -> None:
    """``serve`` with what ``add_build_options`` and ``--host/--port/--state-dir`` parsed."""
    serve(
        args.host,
        args.port,
        args.state_dir,
        store=args.store,
        offline=args.offline,
        wheelhouse=args.wheelhouse,
        requirements={
            **({"index_url": args.index_url} if args.index_url else {}),
            "allow_index_urls": args.allow_index_url,
            "allow_find_links": args.allow_find_links,
            "allow_includes": args.allow_includes,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
