"""Reading and writing rows for the data_prep scripts: JSONL, a JSON array or Parquet in,
Caravela's JSONL (``id``, ``prompt``, ``answer``, optional ``env``) out. Stdlib only, plus
pyarrow for Parquet (a Caravela dependency)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Convert = Callable[[dict[str, Any], str], dict[str, Any]]
"""(input row, prompt template) -> output row without id/env; ValueError for a bad row."""


def rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of ``path``: ``file:line`` for JSONL, ``file: row n`` else."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {n}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        for n, row in enumerate(json.loads(text), 1):
            yield f"{path}: row {n}", row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", json.loads(line)


def arguments(description: str, template_help: str) -> argparse.ArgumentParser:
    """The options both scripts take."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("input", type=Path, help=".jsonl, .json or .parquet file")
    p.add_argument("output", type=Path, help="Caravela JSONL to write")
    p.add_argument("--env", default="", help="env column for every row (eval.heldout reads it)")
    p.add_argument("--id-prefix", default=None, help="ids are <prefix>-<n> (default: input stem)")
    p.add_argument("--template", default="{prompt}", help=template_help)
    p.add_argument("--limit", type=int, default=None, help="convert the first N rows only")
    p.add_argument(
        "--skip-bad", action="store_true", help="drop rows whose answer cannot be extracted"
    )
    return p


def column(row: dict[str, Any], name: str) -> str:
    """``row[name]``, a string; ValueError naming the column otherwise."""
    value = row.get(name)
    if not isinstance(value, str):
        got = "missing" if name not in row else f"got {value!r:.60}"
        raise ValueError(f"column {name!r} must be text ({got}; columns: {', '.join(row)})")
    return value


def main(args: argparse.Namespace, convert: Convert) -> int:
    """Convert ``args.input`` row by row into ``args.output``; a bad row stops it with its
    place in the file (or, with ``--skip-bad``, is dropped and counted)."""
    prefix = args.id_prefix or args.input.stem
    out, skipped = [], 0
    for where, row in rows(args.input):
        if args.limit is not None and len(out) >= args.limit:
            break
        try:
            converted = convert(row, args.template)
        except ValueError as e:
            if not args.skip_bad:
                raise SystemExit(f"{where}: {e} (--skip-bad drops such rows)") from None
            skipped += 1
            continue
        env = {"env": args.env} if args.env else {}
        out.append({"id": f"{prefix}-{len(out)}", **converted, **env})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{args.output}: {len(out)} rows" + (f" ({skipped} skipped)" if skipped else ""))
    return 0
