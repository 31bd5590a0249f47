"""Drawing prompts from the datasets' mixture: seeded, epoch by epoch, resumable.

A dataset is drawn by weight, then its next row in a per-epoch shuffled order, so no prompt
repeats within a dataset's epoch and a run is reproducible from its seed. Datasets join
(``add``) and leave (``remove``) the mixture mid-run; the sampler's ``state()`` records the
mixture, so a resume continues the exact stream. ``Prefetcher`` draws and tokenizes the
next batches ahead.

With ``max_prompt_tokens`` (the model's context, ``orchestrator.data.context_limit``, minus
``rollout.max_new_tokens``) a prompt with more tokens is never handed out: where it is
drawn, the dataset's next row takes its place. Each such prompt is logged once, counted in
``metrics()`` (``prompts_too_long/<dataset file stem>``) and recorded in ``state()``, so
the stream and its resume stay exact.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import DatasetSpec
from orchestrator.data import Encode, Prompt, Required, TokenStore, TokenTable, read_dataset


@dataclass
class _Source:
    """One dataset of the mixture; removed ones stay (their prompts may be in flight)."""

    spec: DatasetSpec
    prompts: list[Prompt]
    ids: TokenTable | None
    active: bool = True
    order: list[int] = field(default_factory=list)
    """Rows of the current epoch not drawn yet (popped from the end)."""
    too_long: set[int] = field(default_factory=set)
    """Rows found longer than ``max_prompt_tokens`` (skipped whenever drawn)."""

    def exhausted(self) -> bool:
        """No row fits: every one is too long."""
        return len(self.too_long) == len(self.prompts)

    def metric(self) -> str:
        return f"prompts_too_long/{Path(self.spec.path).stem}"


def _key(spec: DatasetSpec) -> tuple[str, ...]:
    """What makes two specs the same dataset of the mixture (the weight may differ)."""
    mapped = (f"{name}={column}" for name, column in sorted(spec.fields.items()))
    return str(spec.path), spec.env, spec.prompt_field, spec.id_field, *mapped


class PromptSampler:
    """Draws prompts from several datasets by weight, epoch by epoch within each.

    ``store`` (``orchestrator.prepare.PreparedStore``): prompts come with the token ids
    ``caravela data prepare`` wrote for their dataset, when it did.
    ``max_prompt_tokens``: prompts with more token ids are skipped (``limit``).
    ``required``: env name -> the fields its scorer needs (``orchestrator.data.required_fields``);
    a dataset lacking one is refused as it loads.
    """

    def __init__(
        self,
        specs: Sequence[DatasetSpec],
        seed: int = 0,
        store: TokenStore | None = None,
        *,
        max_prompt_tokens: int | None = None,
        encode: Encode | None = None,
        required: Mapping[str, Required] | None = None,
        log: Callable[[str], Any] = print,
    ) -> None:
        self.rng = random.Random(seed)
        self.required = dict(required or {})
        self.store = store
        self.log = log
        self.max_prompt_tokens: int | None = None
        self.encode: Encode | None = None
        self.limit(max_prompt_tokens, encode)
        self._logged: set[str] = set()
        """Ids of over-long prompts logged already (kept across ``restore``: once per run)."""
        self.sources: list[_Source] = []
        self.by_id: dict[str, tuple[int, int]] = {}
        """Prompt id -> (source, row), over every source ever in the mixture."""
        self.first: list[Prompt] = []
        """Prompts handed out before any new draw (in-flight prompts of a resumed run)."""
        for spec in specs:
            self._load(spec)

    def limit(self, max_prompt_tokens: int | None, encode: Encode | None = None) -> None:
        """Skip prompts of more than ``max_prompt_tokens`` token ids (None: keep all).
        Prompts without prepared ids are measured with ``encode`` and handed out with the
        ids it gave them. Call before the first ``sample``."""
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(
                f"max_prompt_tokens = {max_prompt_tokens} leaves no room for a prompt: the "
                "model's context is not longer than rollout.max_new_tokens; lower "
                "rollout.max_new_tokens or use a model with a longer context"
            )
        self.max_prompt_tokens = max_prompt_tokens
        self.encode = encode if encode is not None else self.encode

    def _load(self, spec: DatasetSpec) -> None:
        prompts = read_dataset(spec, self.required.get(spec.env, ()))
        ids = self.store.load(spec, prompts) if self.store is not None else None
        self._append(_Source(spec, prompts, ids))

    def _append(self, source: _Source) -> None:
        clash = next((p.id for p in source.prompts if p.id in self.by_id), None)
        if clash is not None:
            raise ValueError(
                f"prompt id {clash!r} is in both {self.sources[self.by_id[clash][0]].spec.path} "
                f"and {source.spec.path}; ids must be unique across the datasets of a run"
            )
        s = len(self.sources)
        self.by_id.update((p.id, (s, row)) for row, p in enumerate(source.prompts))
        self.sources.append(source)

    def _prompt(self, s: int, row: int) -> Prompt:
        source = self.sources[s]
        p = source.prompts[row]
        if source.ids is None:
            return p
        return Prompt(p.id, p.text, p.env, p.fields, source.ids[row])

    def _pop(self, s: int, taken: set[int] | frozenset[int] = frozenset()) -> int:
        """The next row of dataset ``s`` in its epoch's order (a new epoch when it is done).
        A new epoch puts the rows in ``taken`` (drawn for the same batch) last, so a batch
        crossing an epoch boundary repeats a prompt only when the dataset has fewer rows
        than the batch draws from it."""
        source = self.sources[s]
        if not source.order:
            order = list(range(len(source.prompts)))
            self.rng.shuffle(order)
            # popped from the end: the rows taken already go to the front
            source.order = [r for r in order if r in taken] + [r for r in order if r not in taken]
        return source.order.pop()

    def _live(self) -> list[int]:
        """The datasets drawn from: in the mixture, with a row that fits."""
        return [i for i, s in enumerate(self.sources) if s.active and not s.exhausted()]

    def sample(self, n: int) -> list[Prompt]:
        head, self.first = self.first[:n], self.first[n:]
        if self.max_prompt_tokens is not None:
            head = self._fitting([self.by_id[p.id] for p in head], replace=False)
        live = self._live()
        if len(head) < n and not live:
            self.first = head + self.first
            if any(s.active for s in self.sources):
                raise ValueError(self._nothing_fits())
            raise ValueError("every dataset was removed from the prompt mixture; add one first")
        weights = [self.sources[i].spec.weight for i in live]
        picks = self.rng.choices(live, weights=weights, k=n - len(head)) if live else []
        drawn = [self.by_id[p.id] for p in head]
        for s in picks:
            drawn.append((s, self._pop(s, {row for t, row in drawn if t == s})))
        drawn = drawn[len(head) :]
        if self.max_prompt_tokens is None:
            return head + [self._prompt(s, row) for s, row in drawn]
        return head + self._fitting(drawn, replace=True)

    def _fitting(self, slots: list[tuple[int, int]], replace: bool) -> list[Prompt]:
        """The prompts at (dataset, row) ``slots``, in order, each with its token ids, those
        over ``max_prompt_tokens`` recorded and left out; ``replace``: each left-out one is
        replaced by its dataset's next row (by another weighted pick once none of that
        dataset's rows fits), checked the same way."""
        limit = self.max_prompt_tokens
        assert limit is not None
        out: list[Prompt | None] = [None] * len(slots)
        todo = list(enumerate(slots))
        while todo:
            fresh = [(i, s, row) for i, (s, row) in todo if row not in self.sources[s].too_long]
            measured = self._measured([self._prompt(s, row) for _, s, row in fresh])
            fits = {i: p for (i, _, _), p in zip(fresh, measured, strict=True)}
            again: list[tuple[int, tuple[int, int]]] = []
            for i, (s, row) in todo:
                p = fits.get(i)
                if p is not None:
                    assert p.prompt_ids is not None
                    if len(p.prompt_ids) <= limit:
                        out[i] = p
                        continue
                    self._too_long(s, row, len(p.prompt_ids))
                if not replace:
                    continue
                if self.sources[s].exhausted():
                    live = self._live()
                    if not live:
                        raise ValueError(self._nothing_fits())
                    weights = [self.sources[j].spec.weight for j in live]
                    (s,) = self.rng.choices(live, weights=weights)
                again.append((i, (s, self._pop(s))))
            todo = again
        return [p for p in out if p is not None]

    def _measured(self, prompts: list[Prompt]) -> list[Prompt]:
        """``prompts`` with their token ids: prepared, else from ``encode``."""
        todo = [i for i, p in enumerate(prompts) if p.prompt_ids is None]
        if not todo:
            return prompts
        if self.encode is None:
            path = self.sources[self.by_id[prompts[todo[0]].id][0]].spec.path
            raise ValueError(
                f"{path}: its prompts have no prepared token ids (`caravela data prepare`) and "
                "this sampler has no encode to count them against max_prompt_tokens; pass "
                "encode (texts -> token ids)"
            )
        out = list(prompts)
        for i, ids in zip(todo, self.encode([prompts[i].text for i in todo]), strict=True):
            out[i] = dataclasses.replace(prompts[i], prompt_ids=tuple(ids))
        return out

    def _too_long(self, s: int, row: int, tokens: int) -> None:
        source = self.sources[s]
        source.too_long.add(row)
        p = source.prompts[row]
        if p.id in self._logged:
            return
        self._logged.add(p.id)
        self.log(
            f"{source.spec.path}: prompt {p.id!r} has {tokens} tokens, more than "
            f"max_prompt_tokens = {self.max_prompt_tokens} (the model's context minus "
            f"rollout.max_new_tokens); skipped in every epoch, counted in {source.metric()}"
        )

    def _nothing_fits(self) -> str:
        paths = ", ".join(str(s.spec.path) for s in self.sources if s.active)
        return (
            f"no prompt of the sampled datasets fits max_prompt_tokens = "
            f"{self.max_prompt_tokens} (the model's context minus rollout.max_new_tokens): "
            f"{paths}; lower rollout.max_new_tokens or add a dataset with shorter prompts"
        )

    def metrics(self) -> dict[str, float]:
        """Run totals: per dataset file stem, its prompts found longer than
        ``max_prompt_tokens`` so far (each counted once, skipped whenever drawn). Empty
        without a limit."""
        out: dict[str, float] = {}
        if self.max_prompt_tokens is not None:
            for s in self.sources:
                out[s.metric()] = out.get(s.metric(), 0.0) + float(len(s.too_long))
        return out

    def add(self, spec: DatasetSpec, required: Required | None = None) -> None:
        """``spec`` joins the mixture with its weight from the next ``sample()`` on; a dataset
        removed before comes back where its epoch stopped. ``required``: the fields its env
        needs, when the env is new to this sampler."""
        if required is not None:
            self.required[spec.env] = required
        for source in self.sources:
            if _key(source.spec) == _key(spec):
                if source.active:
                    raise ValueError(f"dataset {spec.path} ({spec.env}) is already sampled")
                source.spec, source.active = spec, True
                return
        self._load(spec)

    def envs(self) -> set[str]:
        """The envs whose datasets are drawn from now."""
        return {s.spec.env for s in self.sources if s.active}

    def remove(self, env: str) -> None:
        """Stop drawing the prompts of every dataset tagged ``env`` (those handed out stay)."""
        tagged = [s for s in self.sources if s.active and s.spec.env == env]
        if not tagged:
            envs = sorted({s.spec.env for s in self.sources if s.active})
            raise ValueError(f"no dataset tagged {env!r} is sampled (sampled envs: {envs})")
        for s in tagged:
            s.active = False

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the exact same prompt stream (JSON-able, a copy)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "orders": [list(s.order) for s in self.sources],
            "first": [p.id for p in self.first],
            "datasets": [
                {
                    **s.spec.model_dump(mode="json"),
                    "active": s.active,
                    "rows": len(s.prompts),
                    "too_long": sorted(s.too_long),
                }
                for s in self.sources
            ],
        }

    def restore(self, state: dict[str, Any], inflight: Sequence[str] = ()) -> None:
        """Continue from ``state``; ``inflight`` prompt ids (drawn, never trained on) come first.

        The state's dataset list wins over the one this sampler was built with: datasets
        added since are loaded, ones it never had are dropped.
        """
        if "datasets" in state:  # states from before add/remove: the constructor's datasets
            self._restore_sources(state["datasets"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for source, order in zip(self.sources, state["orders"], strict=True):
            source.order = list(order)
        missing = [i for i in [*inflight, *state["first"]] if i not in self.by_id]
        if missing:
            raise ValueError(f"the checkpoint names prompts no dataset holds: {missing[:5]}")
        self.first = [self._prompt(*self.by_id[i]) for i in [*inflight, *state["first"]]]

    def _restore_sources(self, saved: list[dict[str, Any]]) -> None:
        own = ("active", "rows", "too_long")
        specs = [
            DatasetSpec.model_validate({k: v for k, v in d.items() if k not in own}) for d in saved
        ]
        if [_key(s.spec) for s in self.sources] != [_key(x) for x in specs]:
            had = {_key(s.spec): s for s in self.sources}
            self.sources, self.by_id = [], {}
            for spec in specs:
                old = had.get(_key(spec))
                if old is None:
                    self._load(spec)
                else:
                    self._append(old)
        for source, spec, d in zip(self.sources, specs, saved, strict=True):
            if len(source.prompts) != d["rows"]:
                raise ValueError(
                    f"dataset {spec.path} has {len(source.prompts)} rows, the checkpoint's had "
                    f"{d['rows']}: it changed since; restore the file or start a new run"
                )
            source.spec, source.active = spec, bool(d["active"])
            source.too_long = set(d.get("too_long", ()))  # logged by the run that found them
            self._logged.update(source.prompts[row].id for row in source.too_long)


def too_long_metrics(state: dict[str, Any]) -> dict[str, float]:
    """``PromptSampler.metrics()`` as of ``state`` (a ``state()``)."""
    out: dict[str, float] = {}
    for d in state.get("datasets", ()):
        key = f"prompts_too_long/{Path(d['path']).stem}"
        out[key] = out.get(key, 0.0) + float(len(d.get("too_long", ())))
    return out


@dataclass
class _Batch:
    """One batch drawn ahead, with the sampler's state from just before its draw."""

    state: dict[str, Any]
    prompts: list[Prompt] = field(default_factory=list)
    ready: bool = False
    error: BaseException | None = None


class Prefetcher:
    """A ``PromptSampler`` whose next ``depth`` batches of ``batch_size`` are drawn and
    tokenized (the prompts without prepared ids) in a background thread.

    Same ``sample``/``state``/``restore``/``add``/``remove`` as the sampler, same stream:
    draws happen in order, and ``state()`` is the sampler's state from before the oldest
    batch not handed out yet, so a checkpoint never counts prefetched prompts as drawn. A
    ``sample(n)`` of another size, ``add``, ``remove`` and ``restore`` rewind the sampler
    to that state and drop the batches ahead.
    """

    def __init__(
        self,
        sampler: PromptSampler,
        batch_size: int,
        depth: int = 2,
        encode: Encode | None = None,
        *,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """``encode``: texts -> token ids, e.g. ``partial(encode_prompts, tokenizer)`` with a
        tokenizer of its own (HF fast tokenizers must not be shared between threads).
        ``max_prompt_tokens``: the sampler's ``limit``, measuring with ``encode`` where the
        sampler has no encode of its own (every draw happens under this object's lock, so
        the tokenizer is never used by two threads at once)."""
        self.sampler, self.batch_size, self.depth, self.encode = sampler, batch_size, depth, encode
        if max_prompt_tokens is not None:
            sampler.limit(max_prompt_tokens, sampler.encode or encode)
        self._cond = threading.Condition()
        self._queue: deque[_Batch] = deque()
        self._generation = 0  # bumped whenever the batches ahead are dropped
        self._thread: threading.Thread | None = None
        self._stop = False

    def sample(self, n: int) -> list[Prompt]:
        with self._cond:
            if n != self.batch_size or self._stop:  # closed: draws in the caller's thread
                self._rewind()
                return self._tokenize(self.sampler.sample(n))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
                self._thread.start()
            while not (self._queue and self._queue[0].ready):
                self._cond.wait()
            batch = self._queue.popleft()
            self._cond.notify_all()
            if batch.error is not None:
                self._queue.appendleft(batch)
                self._rewind()
                raise batch.error
            return batch.prompts

    def state(self) -> dict[str, Any]:
        with self._cond:
            return self._queue[0].state if self._queue else self.sampler.state()

    def metrics(self) -> dict[str, float]:
        """The sampler's ``metrics()`` as of the prompts handed out (not those drawn ahead)."""
        with self._cond:
            if not self._queue or self.sampler.max_prompt_tokens is None:
                return self.sampler.metrics()
            return too_long_metrics(self._queue[0].state)

    def restore(self, state: dict[str, Any], inflight: Sequence[str] = ()) -> None:
        with self._cond:
            self._rewind()
            self.sampler.restore(state, inflight)

    def add(self, spec: DatasetSpec, required: Required | None = None) -> None:
        with self._cond:
            self._rewind()
            self.sampler.add(spec, required)

    def remove(self, env: str) -> None:
        with self._cond:
            self._rewind()
            self.sampler.remove(env)

    def envs(self) -> set[str]:
        with self._cond:
            return self.sampler.envs()

    def close(self) -> None:
        """Stop the background thread (the batches ahead are dropped; ``sample`` still
        works, drawing in the caller's thread)."""
        with self._cond:
            self._rewind()
            self._stop = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rewind(self) -> None:
        """Back to the state before the batches ahead (caller holds the lock)."""
        if self._queue:
            self.sampler.restore(self._queue[0].state)
            self._queue.clear()
        self._generation += 1
        self._cond.notify_all()

    def _tokenize(self, prompts: list[Prompt]) -> list[Prompt]:
        todo = [i for i, p in enumerate(prompts) if p.prompt_ids is None]
        if self.encode is None or not todo:
            return prompts
        out = list(prompts)
        for i, ids in zip(todo, self.encode([prompts[i].text for i in todo]), strict=True):
            out[i] = dataclasses.replace(prompts[i], prompt_ids=tuple(ids))
        return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and len(self._queue) >= self.depth:
                    self._cond.wait()
                if self._stop:
                    return
                generation = self._generation
                batch = _Batch(self.sampler.state())
                self._queue.append(batch)
                try:
                    drawn = self.sampler.sample(self.batch_size)
                except Exception as e:  # re-raised in the caller's thread by sample()
                    batch.error, batch.ready, self._thread = e, True, None
                    self._cond.notify_all()
                    return
            try:
                prompts, error = self._tokenize(drawn), None
            except Exception as e:  # re-raised in the caller's thread by sample()
                prompts, error = drawn, e
            with self._cond:
                if generation == self._generation:
                    batch.prompts, batch.error, batch.ready = prompts, error, True
                    self._cond.notify_all()
                if error is not None:
                    self._thread = None
                    return
