"""The loop's side of the circuit breaker (``orchestrator.loop.quarantine``): an env the
scorer quarantined stops being drawn from, with a log line saying why, and the run goes on
with the others; once every env of the run is quarantined the run stops with the reason.
Real scorer (``LocalScorer``, env worker processes) and real prompt sampler; the parts the
function does not touch (engines, trainers) are left out of the stand-in ``parts``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config import DatasetSpec
from orchestrator.loop import quarantine
from orchestrator.sampler import PromptSampler
from reward_envs.config import EnvSpec
from reward_envs.protocol import Item

CHAOS = Path(__file__).parents[1] / "reward_envs" / "envs" / "chaos"


def dataset(tmp_path: Path, env: str) -> DatasetSpec:
    path = tmp_path / f"{env}.jsonl"
    rows = [{"id": f"{env}-{i}", "prompt": f"Q: {i} A: ", "answer": str(i)} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetSpec(path=path, env=env)


def test_a_quarantined_env_is_no_longer_drawn_and_all_quarantined_stops(tmp_path):
    from reward_envs.scorer import LocalScorer

    envs = [
        EnvSpec(name=n, path=CHAOS, workers=1, breaker_window=4, breaker_min_items=4)
        for n in ("bad", "worse", "good")
    ]
    scorer = LocalScorer(envs, log_dir=tmp_path / "logs")
    try:
        sampler = PromptSampler([dataset(tmp_path, e.name) for e in envs], seed=0)
        parts = SimpleNamespace(scorer=scorer)
        lines: list[str] = []
        quarantine(parts, sampler, lines.append)  # nothing tripped: nothing changes
        assert sampler.envs() == {"bad", "worse", "good"} and not lines

        scorer.score("bad", [Item("p", "raise", {})] * 4)
        quarantine(parts, sampler, lines.append)
        assert sampler.envs() == {"worse", "good"}
        assert lines == [
            "env 'bad' quarantined: 4 of its last 4 items errored (exception 4): "
            "its prompts are no longer drawn"
        ]
        assert {p.env for _ in range(10) for p in sampler.sample(8)} == {"worse", "good"}

        scorer.score("worse", [Item("p", "raise", {})] * 4)
        scorer.score("good", [Item("p", "raise", {})] * 4)
        with pytest.raises(RuntimeError, match="every env of the run is now quarantined"):
            quarantine(parts, sampler, lines.append)
    finally:
        scorer.close()
