"""Every built-in env, in its own venv (pre-built by `make envs`), scores its case table
and its manifest examples as declared."""

import json

import pytest

from reward_envs.builder import prepare
from reward_envs.main import builtin_envs
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item

ENVS = {d.name: d for d in builtin_envs()}


@pytest.mark.parametrize("name", sorted(ENVS))
def test_builtin_env_scores_its_cases_in_its_own_venv(name, tmp_path):
    env = ENVS[name]
    manifest = load_manifest(env)
    cases = (
        [
            {**json.loads(line), "why": json.loads(line).get("why", "")}
            for line in (env / "cases.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (env / "cases.jsonl").exists()
        else []
    )
    examples = [
        {
            "prompt": e.prompt,
            "completion": e.completion,
            "expected_score": e.expected_score,
            "fields": manifest.fields(e),
            "why": "manifest example",
        }
        for e in manifest.examples
    ]
    rows = [
        {
            "prompt": c["prompt"],
            "completion": c["completion"],
            "expected_score": c["expected_score"],
            "fields": {
                k: v
                for k, v in c.items()
                if k not in ("id", "prompt", "completion", "expected_score", "why")
            },
            "why": c["why"],
        }
        for c in cases
    ] + examples
    assert len(examples) >= 3
    built = prepare(env, manifest.isolation)
    pool = EnvPool(manifest, built, workers=2, log_dir=tmp_path)
    try:
        results = pool.score([Item(r["prompt"], r["completion"], r["fields"]) for r in rows])
    finally:
        pool.close()
    wrong = [
        (r["completion"], r["fields"], r["expected_score"], res.score, res.error, r["why"])
        for r, res in zip(rows, results, strict=True)
        if res.score != r["expected_score"]
    ]
    assert not wrong, wrong
