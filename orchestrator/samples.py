"""The samples log, ``<run>/samples/``: one JSON line per completion of every step, enough to
audit any training step: which prompt and request it answered, which weights (policy
version) and engine produced it, which env and env build scored it, its score or the error
that stands for it (never a 0), its length, how it finished, whether it was trained on, and
its text (clipped).

    samples/samples.jsonl                  the steps since the last rotation
    samples/samples-<first>-<last>.jsonl.gz  closed segments, gzip, steps first..last
    samples/samples.superseded.jsonl.gz    the samples of steps a resumed run redid

The current file is closed into a segment before a step that would take it past
``logging.samples_rotate_mb``; a step's samples never span two files. The directory
(segments and current file) stays under ``logging.samples_max_mb``: at each rotation the
oldest segments are deleted (and the deletion logged) until the current file has room to
grow to ``samples_rotate_mb`` (bounds that hold unless one step's samples alone are larger).

A resumed run, or a trainer group formed again from a checkpoint, moves the samples of the
steps it redoes to the superseded file (``rewind``, as ``orchestrator.record`` does for
``metrics.jsonl``), reaching into the segments when the checkpoint is older than the last
rotation, so every step's samples appear exactly once. ``read`` (and ``caravela samples
RUN_DIR``) reads segments and current file alike.

Text: a completion's text is what an audit wants most, so it is kept by default, clipped to
``logging.samples_text_chars`` (1000): the first and last half of that many characters with
``…[N chars]…`` between them, so the answer the verifier read (at the end) is always there.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.trackers import LoggingConfig

if TYPE_CHECKING:  # the reader (``caravela samples``) needs no torch
    from orchestrator.rollout import Rollout

DIR = "samples"
CURRENT = "samples.jsonl"
SUPERSEDED = "samples.superseded.jsonl.gz"
SEGMENT = re.compile(r"samples-(\d+)-(\d+)\.jsonl\.gz")
MB = 2**20
ERROR_CHARS = 2000
"""An error message is clipped to this many characters (a traceback can be long)."""


def clip(text: str, chars: int) -> str:
    """``text`` if it has at most ``chars`` characters, else its first and last ``chars // 2``
    with the number of characters cut between them."""
    if len(text) <= chars:
        return text
    head, tail = chars // 2, chars - chars // 2
    return f"{text[:head]}…[{len(text) - chars} chars]…{text[len(text) - tail :]}"


def trained_groups(r: Rollout, drop_zero_variance: bool) -> list[bool]:
    """Per group: does ``rollout.build_batch`` train on it (every completion scored and,
    when zero-variance groups are dropped, not all rewards equal)."""
    import torch

    from trainer.advantages import zero_variance_groups

    kept = []
    for group in r.scores:
        scores = [s.score for s in group]
        if any(x is None for x in scores):
            kept.append(False)
        elif drop_zero_variance and bool(zero_variance_groups(torch.tensor([scores]))[0]):
            kept.append(False)
        else:
            kept.append(True)
    return kept


def records(
    step: int, r: Rollout, text_chars: int, drop_zero_variance: bool
) -> list[dict[str, Any]]:
    """One record per completion of ``r``, group by group, in sampling order."""
    out = []
    kept_groups = trained_groups(r, drop_zero_variance)
    groups = zip(r.prompts, r.requests, r.results, r.scores, kept_groups, strict=True)
    for prompt, request, result, scores, kept in groups:
        for i, (c, s) in enumerate(zip(result.completions, scores, strict=True)):
            rec: dict[str, Any] = {
                "step": step,
                "request": request.request_id,
                "prompt": prompt.id,
                "sample": i,
                "env": s.env,
                "env_build": s.build_hash,
                "policy_version": c.policy_version,
                "engine": c.engine_id,
                "score": s.score,
                "error": None
                if s.score is not None
                else {"kind": s.error_kind, "message": clip(s.error or "", ERROR_CHARS)},
                "tokens": len(c.token_ids),
                "finish": c.finish_reason,
                "trained": kept and bool(c.token_ids),  # build_batch skips empty completions
            }
            if text_chars:
                rec["text"] = clip(c.text, text_chars)
            out.append(rec)
    return out


def segments(directory: Path) -> list[tuple[int, int, Path]]:
    """The closed segments in ``directory``: (first step, last step, path), oldest first."""
    found = []
    for path in Path(directory).glob("samples-*.jsonl.gz"):
        m = SEGMENT.fullmatch(path.name)
        if m:
            found.append((int(m[1]), int(m[2]), path))
    return sorted(found)


def _lines(path: Path) -> list[str]:
    """The complete lines of a segment or of the current file (a partial last line, from a
    crash mid-write, is dropped: its step is redone)."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            text = f.read()
    else:
        text = path.read_text() if path.exists() else ""
    lines = text.split("\n")
    return lines[:-1]  # "" after the last newline, or a partial line


def _step(line: str) -> int:
    return int(json.loads(line)["step"])


def _write_gz(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        f.writelines(x + "\n" for x in lines)
    os.replace(tmp, path)


def supersede(directory: Path, step: int) -> None:
    """Move the samples of steps ``>= step`` in ``directory`` (segments and current file) to
    the superseded file; a segment split by ``step`` keeps its earlier steps under a new
    name. Done again after a crash half-way, it ends in the same place."""
    directory = Path(directory)
    moved: list[str] = []
    done: list[Path] = []
    for first, last, path in segments(directory):
        if last < step:
            continue
        lines = _lines(path)
        kept = [x for x in lines if _step(x) < step]
        moved += [x for x in lines if _step(x) >= step]
        if kept:  # samples-<first>-<last kept>, a name below step: not this one
            _write_gz(directory / f"samples-{first}-{_step(kept[-1])}.jsonl.gz", kept)
        done.append(path)
    current = directory / CURRENT
    lines = _lines(current)
    moved += [x for x in lines if _step(x) >= step]
    if moved:
        with gzip.open(directory / SUPERSEDED, "at") as f:  # one more gzip member
            f.writelines(x + "\n" for x in moved)
    for path in done:
        path.unlink()
    closed = max((last for _, last, _ in segments(directory)), default=-1)
    # a rotation stopped before it removed the current file left its steps in both
    _rewrite(current, [x for x in lines if closed < _step(x) < step])


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, path)


class SamplesLog:
    """The writer of ``<run>/samples/``, owned by ``orchestrator.record.Recorder``."""

    def __init__(
        self,
        directory: Path,
        cfg: LoggingConfig,
        drop_zero_variance: bool,
        log: Callable[[str], Any],
    ) -> None:
        self.dir, self.cfg, self.drop, self.log = Path(directory), cfg, drop_zero_variance, log
        self.first: int | None = None  # the first and last step in the current file
        self.last: int | None = None
        self.bytes = 0  # its size
        self.file: Any = None

    @classmethod
    def open(
        cls,
        run_dir: Path,
        cfg: LoggingConfig,
        start_step: int,
        drop_zero_variance: bool = True,
        log: Callable[[str], Any] = print,
    ) -> SamplesLog:
        """The samples log of ``run_dir``, continuing at ``start_step``: the samples of any
        later step a previous try wrote move to the superseded file."""
        directory = Path(run_dir) / DIR
        directory.mkdir(parents=True, exist_ok=True)
        samples = cls(directory, cfg, drop_zero_variance, log)
        samples._start(start_step)
        return samples

    def _start(self, step: int) -> None:
        supersede(self.dir, step)
        current = self.dir / CURRENT
        lines = _lines(current)
        self.first, self.last = (_step(lines[0]), _step(lines[-1])) if lines else (None, None)
        self.bytes = current.stat().st_size if current.exists() else 0
        self.file = open(current, "ab")  # noqa: SIM115

    def write(self, step: int, rollout: Rollout) -> None:
        """Every completion of ``rollout`` (step ``step``'s, as trained). The current file is
        closed into a segment first when they would take it past ``samples_rotate_mb``."""
        recs = records(step, rollout, self.cfg.samples_text_chars, self.drop)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
        if self.first is not None and self.bytes + len(data) > self.cfg.samples_rotate_mb * MB:
            self._rotate()
        self.file.write(data)
        self.file.flush()
        self.bytes += len(data)
        self.first = step if self.first is None else self.first
        self.last = step

    def _rotate(self) -> None:
        self.file.close()
        current = self.dir / CURRENT
        _write_gz(self.dir / f"samples-{self.first}-{self.last}.jsonl.gz", _lines(current))
        current.unlink()
        self.first = self.last = None
        self.bytes = 0
        self.file = open(current, "ab")  # noqa: SIM115
        self._trim()

    def _trim(self) -> None:
        """Delete the oldest segments until they leave the current file room to grow to
        ``samples_rotate_mb`` under ``samples_max_mb``."""
        limit = self.cfg.samples_max_mb
        if not limit:  # 0: no bound
            return
        for first, last, path in segments(self.dir):
            if size(self.dir) <= (limit - self.cfg.samples_rotate_mb) * MB:
                return
            path.unlink()
            self.log(
                f"samples: deleted {path.name} (steps {first}-{last}): {DIR}/ would grow past "
                f"logging.samples_max_mb = {limit:g}; raise it to keep more"
            )

    def rewind(self, step: int) -> None:
        """The run goes on from ``step`` again: the samples of the steps it redoes move to
        the superseded file."""
        self.file.close()
        self._start(step)

    def close(self) -> None:
        self.file.close()


def size(directory: Path) -> int:
    """Bytes of the segments and the current file in ``directory`` (not the superseded
    file: it grows only by the steps redone, at most a checkpoint interval per restart)."""
    current = Path(directory) / CURRENT
    return sum(p.stat().st_size for _, _, p in segments(directory)) + (
        current.stat().st_size if current.exists() else 0
    )


def read(
    run_dir: Path, step: int | None = None, env: str | None = None
) -> Iterator[dict[str, Any]]:
    """The samples in ``<run_dir>/samples/`` (segments, then the current file), oldest
    first; only step ``step``'s and env ``env``'s when given."""
    directory = Path(run_dir) / DIR
    paths = [p for first, last, p in segments(directory) if step is None or first <= step <= last]
    paths.append(directory / CURRENT)
    for path in paths:
        for line in _lines(path):
            rec = json.loads(line)
            if (step is None or rec["step"] == step) and (env is None or rec["env"] == env):
                yield rec


def last_step(run_dir: Path) -> int | None:
    """The last step in ``<run_dir>/samples/``; None when it holds none."""
    directory = Path(run_dir) / DIR
    lines = _lines(directory / CURRENT)
    if lines:
        return _step(lines[-1])
    closed = segments(directory)
    return closed[-1][1] if closed else None


def describe(rec: dict[str, Any]) -> str:
    """One sample as a line of ``caravela samples``."""
    error = rec["error"]
    outcome = f"score {rec['score']:g}" if error is None else f"error {error['kind']}"
    head = (
        f"step {rec['step']}  {rec['request']}[{rec['sample']}]  {rec['env']}@"
        f"{rec['env_build'][:12]}  v{rec['policy_version']} {rec['engine']}  {outcome}  "
        f"{'trained' if rec['trained'] else 'not trained'}  {rec['tokens']} tok "
        f"{rec['finish']}"
    )
    if error is not None:
        head += f"  | {error['message']!r}"
    if "text" in rec:
        head += f"  | {rec['text']!r}"
    return head
