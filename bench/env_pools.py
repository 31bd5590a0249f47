"""Env pools: scoring overhead of process isolation, and readiness of 30 envs.

Run: ``.venv/bin/python bench/env_pools.py`` (needs PyPI for the cold builds; no Ray;
~3 min). Writes ``bench/results/env_pools.json`` and ``.md``.

1. Scoring throughput of the built-in ``math`` env (math-verify, in its own venv) on 256
   items: through an ``EnvPool`` with 1 and 2 workers vs calling the same ``score``
   function in a loop in one process of the same venv. Items: the env's case table
   cycled to 256. Median of 3 timed calls after a warm-up call.
2. Readiness of 30 envs, each with a different small set of PyPI requirements: cold =
   empty env store and empty uv cache, every env built then its pool started (1 worker);
   warm = the same with the store already built (what a second run or another node
   sharing the store sees).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reward_envs.builder import build  # noqa: E402
from reward_envs.manifest import load_manifest  # noqa: E402
from reward_envs.pool import EnvPool  # noqa: E402
from reward_envs.protocol import Item  # noqa: E402

MATH = REPO / "reward_envs" / "builtin" / "math"
BATCH = 256

IN_PROCESS = """
import importlib.util, json, statistics, sys, time
spec = importlib.util.spec_from_file_location("env", sys.argv[1] + "/env.py")
env = importlib.util.module_from_spec(spec); spec.loader.exec_module(env)
items = json.load(open(sys.argv[2]))
def once():
    t0 = time.perf_counter()
    for i in items:
        env.score(i["prompt"], i["completion"], **i["fields"])
    return time.perf_counter() - t0
once()
print(statistics.median(once() for _ in range(3)))
"""

SMALL = [
    "six", "idna", "attrs", "packaging", "pyparsing", "toml", "tomli", "certifi",
    "charset-normalizer", "python-dateutil", "pytz", "tabulate", "wcwidth", "colorama",
    "click", "itsdangerous", "markupsafe", "more-itertools", "zipp", "decorator",
]  # fmt: skip


def math_items() -> list[Item]:
    rows = [json.loads(x) for x in (MATH / "cases.jsonl").read_text().splitlines() if x.strip()]
    skip = ("id", "prompt", "completion", "expected_score", "why")
    items = [
        Item(r["prompt"], r["completion"], {k: v for k, v in r.items() if k not in skip})
        for r in rows
    ]
    return [items[i % len(items)] for i in range(BATCH)]


def scoring(store: Path) -> dict[str, float]:
    built = build(MATH, store)
    items = math_items()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"prompt": i.prompt, "completion": i.completion, "fields": i.fields}
                   for i in items], f)  # fmt: skip
    out = subprocess.run(
        [built.python, "-c", IN_PROCESS, str(MATH), f.name], capture_output=True, text=True
    )
    os.unlink(f.name)
    if out.returncode:
        raise RuntimeError(out.stderr)
    result = {"in_process_s": float(out.stdout.split()[-1])}
    manifest = load_manifest(MATH)
    for workers in (1, 2):
        pool = EnvPool(manifest, built, workers=workers)
        try:
            pool.score(items)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                res = pool.score(items)
                times.append(time.perf_counter() - t0)
            assert all(r.error is None for r in res), [r.error for r in res if r.error][:3]
        finally:
            pool.close()
        result[f"pool_{workers}w_s"] = statistics.median(times)
    return result


def make_envs(root: Path) -> list[Path]:
    envs = []
    for i in range(30):
        reqs = [SMALL[i % len(SMALL)]] + ([SMALL[(i * 7 + 3) % len(SMALL)]] if i >= 10 else [])
        d = root / f"e{i:02d}"
        d.mkdir(parents=True)
        imports = "".join(f"import {r.replace('-', '_')}\n" for r in reqs if r.isidentifier())
        (d / "env.py").write_text(f"{imports}\n\ndef score(prompt, completion, **kw):\n"
                                  "    return float(completion == 'x')\n")  # fmt: skip
        (d / "caravela-env.toml").write_text(
            f'name = "e{i:02d}"\nversion = "1"\nentry_point = "env:score"\n'
            f"requirements = {json.dumps(sorted(set(reqs)))}\n"
        )
        envs.append(d)
    return envs


def readiness(envs: list[Path], store: Path) -> float:
    t0 = time.perf_counter()
    pools = []
    for d in envs:
        pools.append(EnvPool(load_manifest(d), build(d, store), workers=1))
    for p in pools:
        assert p.score([Item("p", "x")])[0].score == 1.0
        p.close()
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        result = {"scoring": scoring(tmp_path / "store-math")}
        print(result, flush=True)
        os.environ["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")  # cold: nothing cached
        envs = make_envs(tmp_path / "envs")
        result["readiness_30_envs"] = {
            "cold_s": readiness(envs, tmp_path / "store"),
            "warm_s": readiness(envs, tmp_path / "store"),
        }
    s = result["scoring"]
    lines = [
        "# env pools",
        "",
        f"math env (math-verify in its own venv), {BATCH} items; median of 3 after a warm-up.",
        "",
        "| path | seconds | items/s | share of in-process |",
        "|---|---:|---:|---:|",
    ]
    for key, name in [("in_process_s", "in-process loop"), ("pool_1w_s", "pool, 1 worker"),
                      ("pool_2w_s", "pool, 2 workers")]:  # fmt: skip
        lines.append(
            f"| {name} | {s[key]:.3f} | {BATCH / s[key]:.0f} | {s['in_process_s'] / s[key]:.2f} |"
        )
    r = result["readiness_30_envs"]
    lines += [
        "",
        "30 envs, each with 1-2 small PyPI requirements, 1 worker each, built then started:",
        "",
        f"- cold (empty store, empty uv cache): {r['cold_s']:.1f} s",
        f"- warm (store built): {r['warm_s']:.1f} s",
    ]
    res = REPO / "bench" / "results"
    (res / "env_pools.json").write_text(json.dumps(result, indent=2))
    (res / "env_pools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
