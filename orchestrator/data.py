"""Prompt sources: JSONL datasets tagged with an env, mixed by per-dataset weights.

Each row needs ``id``, ``prompt`` and whatever fields its env's scorer takes
(``answer`` for the built-ins). Sampling is seeded: a dataset is drawn by
weight, then its next row in a per-epoch shuffled order, so no prompt repeats
within a dataset's epoch and a run is reproducible from its seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import DatasetSpec


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt."""

    id: str
    text: str
    env: str
    fields: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: Path, env: str | None = None) -> list[Prompt]:
    """Rows of a JSONL file as prompts; a malformed row is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(
                    Prompt(
                        id=str(row.pop("id")),
                        text=row.pop("prompt"),
                        env=env or row.get("env", ""),
                        fields={k: v for k, v in row.items() if k != "env"},
                    )
                )
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: each row must be a JSON object with 'id' and 'prompt' ({e})"
                ) from None
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


class PromptSampler:
    """Draws prompts from several datasets by weight, epoch by epoch within each."""

    def __init__(self, specs: list[DatasetSpec], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.datasets = [read_jsonl(s.path, s.env) for s in specs]
        self.weights = [s.weight for s in specs]
        self.orders: list[list[int]] = [[] for _ in specs]
        self.by_id = {p.id: p for rows in self.datasets for p in rows}
        self.first: list[Prompt] = []
        """Prompts handed out before any new draw (in-flight prompts of a resumed run)."""

    def _next(self, d: int) -> Prompt:
        if not self.orders[d]:
            order = list(range(len(self.datasets[d])))
            self.rng.shuffle(order)
            self.orders[d] = order
        return self.datasets[d][self.orders[d].pop()]

    def sample(self, n: int) -> list[Prompt]:
        head, self.first = self.first[:n], self.first[n:]
        picks = self.rng.choices(range(len(self.datasets)), weights=self.weights, k=n - len(head))
        return head + [self._next(d) for d in picks]

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the exact same prompt stream (JSON-able)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "orders": self.orders,
            "first": [p.id for p in self.first],
        }

    def restore(self, state: dict[str, Any], inflight: Sequence[str] = ()) -> None:
        """Continue from ``state``; ``inflight`` prompt ids (drawn, never trained on) come first."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.orders = [list(o) for o in state["orders"]]
        self.first = [self.by_id[i] for i in [*inflight, *state["first"]]]
