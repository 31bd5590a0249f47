"""30 reward envs in one run against 1: step time at the same items per step, and pool start-up.

Run (the envs built first; Ray needs a loopback-only network namespace)::

    CARAVELA_ENV_STORE=.cache/env-store .venv/bin/caravela env build examples/many_envs/envs/*
    unshare -n sh -c 'ip link set lo up && exec env CARAVELA_ENV_STORE=.cache/env-store \\
        .venv/bin/python bench/many_envs.py [--steps 10]'

Writes ``bench/results/many_envs.json`` and ``.md``. Local Ray clusters of 64 logical CPUs
(``cluster.num_cpus`` of the config), both node roles:

1. Pools ready from a warm store: ``RayScorer`` over the 30 envs of
   ``examples/configs/many_envs.toml`` (1 worker each) from the call until every pool's
   workers said hello (the constructor starts the node's pool host and all 30 pools in it,
   then waits), against adding the 30 one after the other (``RayScorer.add``), interleaved;
   the same for 1 env; plus ``LocalScorer`` over the 30 (the same pools in this process, no
   Ray), which separates Ray's part (the host process) from the envs' own (interpreter
   start, package import). Median of ``--repeats``.
2. Step time: ``caravela run`` of the same config cut to one env (``eq-all``, its dataset
   only) for ``--steps`` steps, then of the whole config: same model, prompts per step, group
   size and steps, one after the other, each on a local cluster of its own. ``step_seconds``
   median over the steps after the first, and the seconds of generation and scoring in a
   step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "examples" / "configs" / "many_envs.toml"
ONE_ENV = "eq-all"


def timed(make, close, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        obj = make()
        out.append(time.perf_counter() - t0)
        close(obj)
    return out


def stop(scorer) -> None:
    """Stop the pools and their host."""
    scorer.close()


def pools_ready(cfg, log_dir: Path, repeats: int) -> dict[str, list[float]]:
    from reward_envs.scorer import LocalScorer, RayScorer

    def one_by_one() -> RayScorer:  # each env's pools started and waited for in turn
        scorer = RayScorer([], log_dir)
        for spec in cfg.envs:
            scorer.add(spec)
        return scorer

    one = [e for e in cfg.envs if e.name == ONE_ENV]
    out: dict[str, list[float]] = {"ray_30": [], "ray_30_one_by_one": []}
    for _ in range(repeats):  # interleaved: both see the same load
        out["ray_30"] += timed(lambda: RayScorer(cfg.envs, log_dir), stop, 1)
        out["ray_30_one_by_one"] += timed(one_by_one, stop, 1)
    out["ray_1"] = timed(lambda: RayScorer(one, log_dir), stop, repeats)
    out["local_30"] = timed(lambda: LocalScorer(cfg.envs, log_dir), lambda s: s.close(), repeats)
    return out


def one_env(cfg):
    """``cfg`` with only ``ONE_ENV`` and its dataset."""
    return cfg.model_copy(
        update={
            "envs": [e for e in cfg.envs if e.name == ONE_ENV],
            "datasets": [d for d in cfg.datasets if d.env == ONE_ENV],
        }
    )


def steps_of(cfg, label: str) -> dict[str, float | str]:
    from orchestrator.loop import run

    t0 = time.perf_counter()
    run(cfg, log=lambda *_: None)
    wall = time.perf_counter() - t0
    rows = [
        json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    later = rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r.get(key, float("nan")) for r in later)

    return {
        "envs": float(len(cfg.envs)),
        "steps": float(len(rows)),
        "step_seconds": med("step_seconds"),
        "seconds/generate": med("seconds/generate"),
        "seconds/score": med("seconds/score"),
        "seconds/score_tail": med("seconds/score_tail"),
        "seconds/train": med("seconds/train"),
        "items_per_step": statistics.median(r["items_scored"] + r["reward_errors"] for r in rows),
        "run_wall_s": wall,
        "label": label,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=1, help="1-env/30-env run pairs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    import ray

    from orchestrator.cluster import start_local
    from orchestrator.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="many-envs-"))
    overrides = [
        f"steps={args.steps}",
        "eval.num_prompts=2",
        "eval.k=1",
        "checkpoint.every_steps=0",
        "trainer.cpus_per_rank=1",
        "inference.backend={type='transformers', cpus_per_engine=1}",
    ]
    base = load_config(CONFIG, [*overrides, f"output_dir='{tmp / 'run30'}'"])
    t0 = time.perf_counter()
    start_local(
        tmp / "cluster",
        num_cpus=base.cluster.num_cpus,
        resources={"inference_node": 1, "trainer_node": 1},
        dashboard=False,
        log=lambda *_: None,
    )
    cluster_s = time.perf_counter() - t0
    try:
        ready = pools_ready(base, tmp / "logs", args.repeats)
        print(f"pools ready (s): {json.dumps(ready)}", flush=True)
    finally:
        ray.shutdown()
    # each run on a cluster of its own, as `caravela run` starts it (a run's trainer ranks
    # and engines hold their resources until that cluster stops)
    load = [os.getloadavg()[0]]
    runs = []
    for i in range(args.pairs):  # alternated, so both see the same load over time
        one = base.model_copy(update={"output_dir": tmp / f"run1-{i}"})
        runs.append(steps_of(one_env(one), "1 env"))
        many = base.model_copy(update={"output_dir": tmp / f"run30-{i}"})
        runs.append(steps_of(many, "30 envs"))
        load.append(os.getloadavg()[0])

    def step_s(label: str) -> float:
        return statistics.median(float(x["step_seconds"]) for x in runs if x["label"] == label)

    r = base.rollout
    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "prompts_per_step": r.prompts_per_step,
        "group_size": r.group_size,
        "max_new_tokens": r.max_new_tokens,
        "steps": args.steps,
        "cluster_start_s": cluster_s,
        "pools_ready_s": {k: statistics.median(v) for k, v in ready.items()},
        "pools_ready_all_s": ready,
        "runs": runs,
        "load_average_1min": load,
        "cpus": os.cpu_count(),
        "step_time_ratio": step_s("30 envs") / step_s("1 env"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_envs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "many_envs.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    p = res["pools_ready_s"]
    lines = [
        "# many envs",
        "",
        f"`{res['config']}`: {res['prompts_per_step']} prompts x {res['group_size']} "
        f"completions per step ({res['max_new_tokens']} new tokens at most), tiny model on the "
        f"transformers engine, {res['steps']} steps per run; a local Ray cluster started "
        f"in {res['cluster_start_s']:.1f} s.",
        "",
        "Pools ready from a warm env store (1 worker per env; median of "
        f"{len(res['pools_ready_all_s']['ray_30'])}):",
        "",
        "| pools | seconds |",
        "|---|---:|",
        f"| 30 envs, one Ray pool host (RayScorer, started together) | {p['ray_30']:.2f} |",
        f"| 30 envs, one Ray pool host, one env after the other | {p['ray_30_one_by_one']:.2f} |",
        f"| 1 env, one Ray pool host (RayScorer) | {p['ray_1']:.2f} |",
        f"| 30 envs, in this process (LocalScorer) | {p['local_30']:.2f} |",
        "",
        "Step time (median over the steps after the first):",
        "",
        "| run | envs | items/step | step s | generate s | score s | score tail s | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['label']} | {r['envs']:.0f} | {r['items_per_step']:.0f} | "
            f"{r['step_seconds']:.3f} | {r['seconds/generate']:.3f} | {r['seconds/score']:.3f} "
            f"| {r['seconds/score_tail']:.3f} | {r['seconds/train']:.3f} |"
        )
    lines += [
        "",
        f"Step time ratio, 30 envs / 1 env (median step s of each kind): "
        f"{res['step_time_ratio']:.2f}x",
        "",
        f"Machine: {res['cpus']} cores; 1-minute load average before and after each pair: "
        f"{', '.join(f'{x:.1f}' for x in res['load_average_1min'])} (other jobs share it).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
