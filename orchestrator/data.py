"""Prompt sources: JSONL/JSON/Parquet datasets tagged with an env, and their token ids.

Each row needs an id and a prompt (columns ``id`` and ``prompt`` unless the dataset's
``id_field``/``prompt_field`` say otherwise) plus the fields its env's scorer needs (the env
manifest's ``required_fields``: ``answer`` for most built-ins), under the names the dataset's
``fields`` mapping gives its columns (``read_dataset`` checks every row as it loads).
Sampling is seeded: a dataset is drawn by weight, then its next row in a per-epoch shuffled
order, so no prompt repeats within a dataset's epoch and a run is reproducible from its
seed. Datasets join (``add``) and leave (``remove``) the mixture mid-run; the sampler's
``state()`` records the mixture, so a resume continues the exact stream. Prompts carry
their token ids when ``caravela data prepare`` made them (``orchestrator/prepare.py``
writes them, a ``TokenStore`` hands them over). Drawing from the mixture is
``orchestrator.sampler``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.config import DATASET_FORMATS, DatasetSpec
from reward_envs.config import EnvSpec
from reward_envs.manifest import load_manifest, missing_fields

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


Required = Sequence[str | list[str]]
"""Fields an env needs on every item (its manifest's ``required_fields``)."""


def required_fields(envs: Sequence[EnvSpec]) -> dict[str, Required]:
    """Env name -> the fields its scorer needs, from each env's manifest."""
    return {e.name: load_manifest(e.path).required_fields for e in envs}


def read_dataset(spec: DatasetSpec, required: Required = ()) -> list[Prompt]:
    """``spec``'s rows as prompts (its columns and ``fields`` mapping); ``required``: the
    fields its env needs (``required_fields``), an error naming the field, the dataset and
    the env when rows lack one."""
    prompts = read_prompts(spec.path, spec.env, spec.prompt_field, spec.id_field, spec.fields)
    check_fields(prompts, f"dataset {spec.path}", spec.env, required)
    return prompts


def check_fields(prompts: Sequence[Prompt], what: str, env: str, required: Required) -> None:
    """Raise when some of ``prompts`` (the rows of ``what``) lack a field ``env`` needs."""
    for need in required:
        lacking = [p for p in prompts if missing_fields(p.fields, [need])]
        if not lacking:
            continue
        first = lacking[0]
        (text,) = missing_fields(first.fields, [need])
        field, name = (f"the field {text}", need) if isinstance(need, str) else (text, need[0])
        raise ValueError(
            f"{what}: {len(lacking)} of {len(prompts)} rows lack {field}, which env "
            f"{env!r} needs (required_fields in its caravela-env.toml); the first is the row "
            f"with id {first.id!r} (its other columns: {', '.join(first.fields) or 'none'}). "
            "If a column holds it under another name, map it in the dataset's [[datasets]] "
            f'entry: fields = {{ {name} = "<column>" }}'
        )


def read_prompts(
    path: Path,
    env: str | None = None,
    prompt_field: str = "prompt",
    id_field: str = "id",
    fields: Mapping[str, str] | None = None,
) -> list[Prompt]:
    """Rows of a ``.jsonl``/``.json``/``.parquet`` file as prompts, in file order.

    ``env`` tags every row (else a row's own ``env`` column). ``id_field = ""``: ids are
    ``<file stem>-<row number>``. ``fields`` (field -> column) renames columns: a row
    without the column lacks the field; a column in no row is an error. A bad row is an
    error naming file, row and column.
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
    fields = dict(fields or {})
    rows = (
        _parquet_rows(path, prompt_field, id_field, fields)
        if suffix == ".parquet"
        else _json_rows(path)
    )
    mapped_seen: set[str] = set()  # mapped columns found in some row
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    stem = path.stem
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where.format(n)}: each row must be an object, got {row!r:.80}")
        source = dict(row) if fields else row  # a mapped column may be the prompt or id too
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
        if fields:
            for column in fields.values():
                row.pop(column, None)
            row.update((name, source[c]) for name, c in fields.items() if c in source)
            mapped_seen.update(c for c in fields.values() if c in source)
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
    unseen = [f"{name} = {c!r}" for name, c in fields.items() if c not in mapped_seen]
    if unseen:
        raise ValueError(
            f"{path}: no row has the column of fields {{ {', '.join(unseen)} }}; fix the "
            "column names in its [[datasets]] entry"
        )
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


def _parquet_rows(
    path: Path, prompt_field: str, id_field: str, fields: dict[str, str]
) -> Iterator[tuple[int, Any]]:
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
    for name, column in fields.items():
        if column not in columns:
            raise ValueError(
                f"{path}: no column {column!r} (columns: {', '.join(columns)}); fix fields.{name} "
                "in its [[datasets]] entry"
            )
    yield from enumerate(table.to_pylist(), 1)
