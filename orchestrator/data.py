"""Prompt sources: JSONL/JSON/Parquet datasets tagged with an env, and their token ids.

Each row needs an id and a prompt (columns ``id`` and ``prompt`` unless the dataset's
``id_field``/``prompt_field`` say otherwise) plus whatever fields its env's scorer takes
(``answer`` for the built-ins). Sampling is seeded: a dataset is drawn by weight, then its
next row in a per-epoch shuffled order, so no prompt repeats within a dataset's epoch and a
run is reproducible from its seed. Datasets join (``add``) and leave (``remove``) the
mixture mid-run; the sampler's ``state()`` records the mixture, so a resume continues the
exact stream. Prompts carry their token ids when ``caravela data prepare`` made them
(``orchestrator/prepare.py`` writes them, a ``TokenStore`` hands them over). Drawing from
the mixture is ``orchestrator.sampler``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.config import DATASET_FORMATS, DatasetSpec

if TYPE_CHECKING:
    import numpy as np

_MISSING: Any = object()

Encode = Callable[[list[str]], list[list[int]]]
"""Prompt texts -> engine token ids (``[BOS] + ids(text)``), e.g.
``partial(inference_server.tokens.encode_prompts, tokenizer)``."""

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""``config.json`` keys that hold a model's context length, by model family."""


def context_limit(model_dir: Path) -> int | None:
    """The model's context length (prompt + completion tokens) from its ``config.json``:
    ``max_position_embeddings`` or a family's name for it, also under ``text_config``
    (multimodal models); None when the file or the key is missing."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except FileNotFoundError:
        return None
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return int(section[key])
    return None


class TokenTable:
    """One dataset's prepared token ids, row by row: a flat int32 array and row offsets."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> tuple[int, ...]:
        return tuple(self.values[self.offsets[row] : self.offsets[row + 1]].tolist())

    def length(self, row: int) -> int:
        """Tokens in ``row``."""
        return int(self.offsets[row + 1] - self.offsets[row])


class TokenStore(Protocol):
    """Where prepared token ids come from (``orchestrator.prepare.PreparedStore``)."""

    def load(self, spec: DatasetSpec, prompts: Sequence[Prompt]) -> TokenTable | None:
        """``spec``'s ids, row by row, when prepared for exactly these prompts; else None."""
        ...


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt."""

    id: str
    text: str
    env: str
    fields: dict[str, Any] = field(default_factory=dict)
    prompt_ids: tuple[int, ...] | None = None
    """``[BOS] + ids(text)`` (``inference_server.tokens.encode_prompts``) when known:
    prepared ahead of the run or tokenized by the ``Prefetcher``."""


def read_prompts(
    path: Path, env: str | None = None, prompt_field: str = "prompt", id_field: str = "id"
) -> list[Prompt]:
    """Rows of a ``.jsonl``/``.json``/``.parquet`` file as prompts, in file order.

    ``env`` tags every row (else a row's own ``env`` column). ``id_field = ""``: ids are
    ``<file stem>-<row number>``. A bad row is an error naming file, row and column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATASET_FORMATS:
        raise ValueError(
            f"{path}: unsupported dataset format {suffix!r}; use one of {DATASET_FORMATS}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset file {path} not found (relative dataset paths are to the config file)"
        )
    where = f"{path}:{{}}" if suffix == ".jsonl" else f"{path}: row {{}}"  # .format(n)
    rows = _parquet_rows(path, prompt_field, id_field) if suffix == ".parquet" else _json_rows(path)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    stem = path.stem
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where.format(n)}: each row must be an object, got {row!r:.80}")
        if id_field:
            row_id = row.pop(id_field, _MISSING)
            if row_id is _MISSING or row_id is None or isinstance(row_id, (dict, list, float)):
                raise ValueError(_bad_field(where.format(n), row, id_field, row_id))
            row_id = str(row_id)
        else:
            row_id = f"{stem}-{len(prompts)}"
        text = row.pop(prompt_field, _MISSING)
        if not isinstance(text, str):
            raise ValueError(_bad_field(where.format(n), row, prompt_field, text, prompt=True))
        p = Prompt(
            id=row_id,
            text=text,
            env=env or str(row.get("env", "")),
            fields={k: v for k, v in row.items() if k != "env"},
        )
        if seen.setdefault(p.id, n) != n:
            raise ValueError(
                f"{where.format(n)}: id {p.id!r} repeats the one at {where.format(seen[p.id])}; "
                'ids must be unique within a dataset (fix the file, or id_field = "" for '
                "row-number ids)"
            )
        prompts.append(p)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_jsonl(path: Path, env: str | None = None) -> list[Prompt]:
    """``read_prompts`` with the default columns (any supported format, despite the name)."""
    return read_prompts(path, env)


def _bad_field(where: str, row: dict[str, Any], name: str, value: Any, prompt: bool = False) -> str:
    """The error for a row whose id or prompt (``name``, popped: ``value``) is unusable."""
    got = "missing" if value is _MISSING else f"got {value!r}"
    fields = ", ".join([*([name] if value is not _MISSING else []), *row])
    if prompt:
        return (
            f"{where}: {name!r} must be the prompt text ({got}; fields: {fields}); "
            "set prompt_field in its [[datasets]] entry if it is elsewhere"
        )
    return (
        f"{where}: {name!r} must be the row's id, a string or integer ({got}; fields: {fields}); "
        'set id_field in its [[datasets]] entry, or id_field = "" for row-number ids'
    )


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), 1)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:  # one parse for the whole file: twice as fast as a parse per line
        rows = json.loads("[" + ",".join(line for _, line in lines) + "]")
        if len(rows) == len(lines):
            yield from zip((n for n, _ in lines), rows, strict=True)
            return
    except json.JSONDecodeError:
        pass  # find the bad line below
    for n, line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
    raise ValueError(f"{path}: a line holds more than one JSON value; one object per line")


def _parquet_rows(path: Path, prompt_field: str, id_field: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file: {e}") from None
    columns = table.column_names
    for name, key in ((prompt_field, "prompt_field"), (id_field, "id_field")):
        if name and name not in columns:
            raise ValueError(
                f"{path}: no column {name!r} (columns: {', '.join(columns)}); set {key} in its "
                f"[[datasets]] entry to the column that holds it"
                + ("" if key == "prompt_field" else ', or id_field = "" for row-number ids')
            )
    yield from enumerate(table.to_pylist(), 1)
