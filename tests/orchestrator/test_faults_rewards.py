"""``test_faults``'s hung and NaN rewards run, on a Ray cluster of its own (this module's):
after the kills of ``test_faults.py`` on a shared cluster it waited forever (not yet
understood; alone it passes in ~40 s)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from common import paths
from tests.orchestrator.test_faults import (  # noqa: F401, F811 - fixtures
    FAULTY_ENV,
    G,
    N,
    check_every_step,
    configure,
    jsonl,
    ray_cluster,
    record,
    rows,
    run,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def test_hung_and_nan_rewards_are_errors_kept_out_of_the_loss(ray_cluster, record, tmp_path):  # noqa: F811
    """Alongside ``arith``, an env whose rows hang forever or return NaN: the run finishes, the
    hung items are ``timeout`` errors and the NaN ones ``bad_value`` errors, counted per step
    as ``reward_errors/faulty/<kind>``; their groups are not trained on and not averaged into
    the reward as zeros; every metric, the loss included, stays finite."""
    faults = {0: "hang", 1: "nan"}
    train = [
        {**r, "id": f"faulty-{i}", "env": "faulty", **({"fault": faults[i]} if i in faults else {})}
        for i, r in enumerate(rows(paths.TINY_HELDOUT, 108)[100:])  # not in arith's data
    ]
    arith = {r["id"]: r for r in jsonl(paths.TINY_TRAIN)}
    heldout = rows(paths.TINY_HELDOUT, 8)
    cfg = configure(
        tmp_path / "run",
        "steps=3",
        f"datasets=[{{path='{write_jsonl(tmp_path / 'faulty.jsonl', train)}', env='faulty'}}, "
        f"{{path='{paths.TINY_TRAIN}', env='arith'}}]",
        f"envs=[{{name='arith', path='{paths.ARITH_ENV}', isolation={{type='venv'}}}}, "
        f"{{name='faulty', path='{FAULTY_ENV}', isolation={{type='venv'}}, workers=4, "
        "timeout_s=2.0}]",
        "inference.backend={type='transformers', cpus_per_engine=1}",
    )
    run(cfg)
    prompts = {**arith, **{r["id"]: r for r in train}}
    logged, metrics = check_every_step(
        record, Path(cfg.output_dir), prompts, {r["prompt"] for r in heldout}, cfg.steps
    )
    kinds = {"hang": "timeout", "nan": "bad_value"}
    for s, m in zip(logged, metrics, strict=True):
        drawn = Counter(prompts[i].get("fault") for i in s["prompts"])
        for fault, kind in kinds.items():
            assert m.get(f"reward_errors/faulty/{kind}", 0) == G * drawn[fault]
        assert m["groups_kept"] + m["groups_zero_variance"] == N - drawn["hang"] - drawn["nan"]
        assert "loss" in m or m["groups_kept"] == 0
    total = Counter(prompts[i].get("fault") for s in logged for i in s["prompts"])
    assert total["hang"] >= 1 and total["nan"] >= 1, f"no faulty row was drawn: {total}"
    for _, _, items, results in record.scored:
        for it, r in zip(items, results, strict=True):
            if it.fields.get("fault") == "hang":
                assert r.error_kind == "timeout" and "timed out after 2 s" in r.error
            elif it.fields.get("fault") == "nan":
                assert r.error_kind == "bad_value" and "nan" in r.error
    envs = record.scorer.metrics()
    assert envs["envs/faulty/errors/timeout"] == G * total["hang"]
    assert envs["envs/faulty/errors/bad_value"] == G * total["nan"]
    assert envs["envs/faulty/restarts"] >= G * total["hang"]  # each hung worker was killed
    assert envs["envs/arith/errors"] == 0
