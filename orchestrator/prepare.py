"""Prompts tokenized ahead of the run: ``caravela data prepare`` and the store runs read.

    caravela data prepare [CONFIG] [--set KEY=VALUE ...] [--workers N]

tokenizes every dataset of the config (``datasets`` and the held-out sets' files) with the run's
tokenizer and prompt format (``[prompt]``), exactly as the loop would
(``inference_server.tokens.encode_prompts``), in ``N`` worker processes, into
``<store>/<key>.parquet`` (columns ``id`` and ``prompt_ids``, in file order). The key hashes
the dataset file's bytes, its id/prompt columns, the tokenizer's files (its chat template
included), the prompt format and system prompt, and the tokenizers/transformers versions:
an unchanged dataset is never tokenized twice, a changed one, another tokenizer or another
prompt format gets a new file (plain ids are never read for a chat run). Files are written
under a temporary name and renamed, so a reader sees a whole file or none. The store is
``prepared_dir`` of the run config, else ``$CARAVELA_DATA_STORE``, else
``<output_dir>/prepared``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from inference_server.tokens import check_prompt_format, format_key
from orchestrator.config import DatasetSpec, PromptConfig, RunConfig
from orchestrator.data import Prompt, TokenTable, read_dataset, required_fields

FORMAT = "caravela-prepared-v1"
"""Bump when ``encode_prompts`` changes what ids a text gets."""
TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt")
TOKENIZER_PREFIXES = ("tokenizer", "vocab", "spiece", "sentencepiece", "chat_template")


def heldout_specs(cfg: RunConfig) -> list[DatasetSpec]:
    """The held-out sets' files as datasets (their envs play no part in the tokens)."""
    files = dict.fromkeys(s.file for s in cfg.eval.resolved())
    return [DatasetSpec(path=f, env="") for f in files]


def tokenizer_fingerprint(model: Path) -> str:
    """Hash of what decides the token ids: the tokenizer's files and library versions."""
    h = hashlib.sha256(FORMAT.encode())
    for lib in ("tokenizers", "transformers"):
        try:
            h.update(f"{lib}=={version(lib)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{lib} missing\n".encode())
    for f in sorted(Path(model).iterdir()):
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name.startswith(TOKENIZER_PREFIXES)):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def dataset_key(spec: DatasetSpec, tokenizer: str, prompt: PromptConfig | None = None) -> str:
    """Name of ``spec``'s prepared file for the tokenizer with fingerprint ``tokenizer`` and
    the prompt format ``prompt`` (default: plain, no system text)."""
    if not Path(spec.path).is_file():
        raise FileNotFoundError(f"dataset file {spec.path} not found")
    fmt = prompt or PromptConfig()
    h = hashlib.sha256(f"{tokenizer}\0{spec.prompt_field}\0{spec.id_field}\0".encode())
    if key := format_key(fmt.format, fmt.system):  # plain prompts keep their old keys
        h.update(f"{key}\0".encode())
    with open(spec.path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{Path(spec.path).stem}-{h.hexdigest()[:20]}"


class PreparedStore:
    """Where prepared token ids live, for one tokenizer (the run's model directory) and
    prompt format; the ``orchestrator.data.TokenStore`` a ``PromptSampler`` reads them
    through."""

    def __init__(
        self,
        root: Path,
        model: Path,
        log: Callable[[str], Any] = print,
        prompt: PromptConfig | None = None,
    ) -> None:
        self.root, self.model, self.log = Path(root), Path(model), log
        self.prompt = prompt or PromptConfig()
        self._fingerprint: str | None = None

    @classmethod
    def for_run(cls, cfg: RunConfig, log: Callable[[str], Any] = print) -> PreparedStore:
        root = (
            cfg.prepared_dir
            or os.environ.get("CARAVELA_DATA_STORE")
            or Path(cfg.output_dir) / "prepared"
        )
        return cls(Path(root), cfg.model, log, cfg.prompt)

    def path(self, spec: DatasetSpec) -> Path:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.model)
        return self.root / f"{dataset_key(spec, self._fingerprint, self.prompt)}.parquet"

    def load(self, spec: DatasetSpec, prompts: Sequence[Prompt]) -> TokenTable | None:
        """``spec``'s prepared ids when a file for exactly this dataset and tokenizer exists;
        None (and one log line saying so) otherwise."""
        import pyarrow.parquet as pq

        path = self.path(spec)
        if not path.exists():
            self.log(
                f"{spec.path}: no prepared token ids in {self.root} (`caravela data prepare` "
                "makes them); tokenizing on the fly"
            )
            return None
        table = pq.read_table(path)
        if table.column("id").to_pylist() != [p.id for p in prompts]:
            self.log(f"{path}: its ids are not {spec.path}'s; tokenizing on the fly")
            return None
        ids = table.column("prompt_ids").combine_chunks()
        self.log(f"{spec.path}: prepared token ids from {path}")
        return TokenTable(ids.values.to_numpy(), ids.offsets.to_numpy())


_TOKENIZER: tuple[str, Any] = ("", None)
"""The worker processes' (model dir, tokenizer), inherited from the parent where they fork."""


def _load_tokenizer(model: str) -> None:
    global _TOKENIZER
    if _TOKENIZER[0] != model:
        from transformers import AutoTokenizer

        _TOKENIZER = (model, AutoTokenizer.from_pretrained(model))


def _init_worker(model: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _load_tokenizer(model)


def _encode(texts: list[str], prompt: PromptConfig | None = None) -> list[list[int]]:
    from inference_server.tokens import encode_prompts

    fmt = prompt or PromptConfig()
    return encode_prompts(_TOKENIZER[1], texts, fmt.format, fmt.system)


def _write(path: Path, prompts: Sequence[Prompt], ids: Sequence[Sequence[int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([p.id for p in prompts], pa.string()),
            "prompt_ids": pa.array(ids, pa.list_(pa.int32())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def prepare(
    cfg: RunConfig,
    workers: int = 1,
    store: PreparedStore | None = None,
    log: Callable[[str], Any] = print,
) -> list[Path]:
    """Tokenize every dataset of ``cfg`` the store lacks; the prepared files, one per dataset
    (``datasets`` then the held-out sets' files)."""
    store = store or PreparedStore.for_run(cfg, log)
    specs = [*cfg.datasets, *heldout_specs(cfg)]
    paths = [store.path(spec) for spec in specs]
    todo = {p: s for s, p in zip(specs, paths, strict=True) if not p.exists()}  # one per file
    for spec, path in zip(specs, paths, strict=True):
        if path.exists():
            log(f"{spec.path}: up to date ({path})")
    if not todo:
        return paths
    required = required_fields(cfg.envs)
    _load_tokenizer(str(cfg.model))  # before forking: the workers inherit it
    check_prompt_format(_TOKENIZER[1], store.prompt.format, cfg.model)
    encode = partial(_encode, prompt=store.prompt)
    pool = None
    if workers > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(cfg.model),))
    try:
        for path, spec in todo.items():
            t0 = time.perf_counter()
            prompts = read_dataset(spec, required.get(spec.env, ()))  # refused here, early
            texts = [p.text for p in prompts]
            size = max(256, min(8192, -(-len(texts) // (4 * workers))))
            chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
            mapped = pool.imap(encode, chunks) if pool else map(encode, chunks)
            ids = [row for chunk in mapped for row in chunk]
            _write(path, prompts, ids)
            log(
                f"{spec.path}: {len(prompts)} prompts, {sum(map(len, ids))} tokens -> {path} "
                f"({time.perf_counter() - t0:.2f} s, {workers} worker{'s' * (workers > 1)})"
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return paths


def prepared_ids(cfg: RunConfig, store: PreparedStore | None = None) -> dict[str, list[int]]:
    """Prompt id -> token ids, for every dataset of ``cfg`` (and the held-out sets' files) whose
    prepared file exists: the shape of ``orchestrator.rollout.tokenize``'s cache."""
    store = store or PreparedStore.for_run(cfg)
    out: dict[str, list[int]] = {}
    for spec in [*cfg.datasets, *heldout_specs(cfg)]:
        prompts = read_dataset(spec)
        table = store.load(spec, prompts)
        if table is not None:
            out.update((p.id, list(table[i])) for i, p in enumerate(prompts))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``caravela data``'s subcommands (config arguments are added by the caller)."""
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenizer processes (default: the CPU count, at most 8)",
    )


def main(cfg: RunConfig, args: argparse.Namespace) -> int:
    """``caravela data prepare``."""
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    t0 = time.perf_counter()
    paths = prepare(cfg, workers=args.workers)
    print(f"{len(paths)} datasets prepared in {paths[0].parent} ({time.perf_counter() - t0:.1f} s)")
    return 0
