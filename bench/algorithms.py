"""GRPO, PPO and online DPO on the embedded default, same seed: held-out pass@1 against
steps and against seconds.

Each algorithm is one ``caravela run`` (subprocess, ``cluster.mode = "local"``: one
process, so the three share nothing but the machine) of the embedded default with
``--set algorithm=<name>`` and the same seed, steps and evaluation cadence
(``eval.every_steps``): the held-out set is evaluated on the engines before training, every
``--every`` steps and after. pass@1 is the sampled accuracy (``eval/heldout/pass1`` in the
run's metrics; ``before``/``after`` from its ``eval.json``); the time axis is the cumulative
``step_seconds`` of the training loop (start-up and the before/after evaluations left out;
the evaluations every ``--every`` steps run inside a step and are counted, equally for
every algorithm).

    .venv/bin/python bench/algorithms.py --steps 200 --every 50

Writes ``bench/results/algorithms.{json,md,png}`` and keeps the runs under ``--runs``.
``--render`` rewrites the .md/.png from the .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ALGORITHMS = ("grpo", "ppo", "dpo")


def run_one(
    algorithm: str, steps: int, every: int, seed: int, out: Path, extra: list[str]
) -> dict[str, Any]:
    """One run; its held-out curve (step -> pass@1), step seconds and wall time."""
    sets = [
        f"algorithm={algorithm}",
        "cluster.mode=local",
        f"steps={steps}",
        f"seed={seed}",
        f"eval.every_steps={every}",
        f"checkpoint.every_steps={steps}",
        f"output_dir='{out}'",
        *extra,
    ]
    exe = str(Path(sys.executable).parent / "caravela")
    cmd = [exe, "run", "--overwrite", *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "CARAVELA_ENV_STORE": str(REPO / ".cache" / "env-store")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(
            f"{algorithm}: caravela run failed\n{(done.stdout + done.stderr)[-3000:]}"
        )
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((out / "eval.json").read_text())
    seconds, clock = [], 0.0
    for m in metrics:
        clock += m["step_seconds"]
        seconds.append(clock)
    # eval/heldout/pass1 at step s is measured before step s trains (weights of s steps)
    curve = [(0, evals["before"]["accuracy"], 0.0)]
    for m in metrics:
        if "eval/heldout/pass1" in m and m["step"] > 0:
            s = int(m["step"])
            curve.append((s, m["eval/heldout/pass1"], seconds[s - 1]))
    curve.append((len(metrics), evals["after"]["accuracy"], seconds[-1]))
    return {
        "algorithm": algorithm,
        "curve": [{"step": s, "pass1": p, "seconds": t} for s, p, t in curve],
        "before": evals["before"],
        "after": evals["after"],
        "train_seconds": seconds[-1],
        "wall_seconds": wall,
        "overrides": sets,
    }


def render(data: dict[str, Any]) -> None:
    rows = [
        "| algorithm | pass@1 before | pass@1 after | change (points) | greedy after | "
        "train loop s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        b, a = r["before"]["accuracy"], r["after"]["accuracy"]
        rows.append(
            f"| {r['algorithm']} | {b:.3f} | {a:.3f} | {100 * (a - b):+.1f} | "
            f"{r['after']['greedy_accuracy']:.3f} | {r['train_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    curves = [
        "",
        "Held-out pass@1 by step:",
        "",
        "| algorithm | " + " | ".join(str(p["step"]) for p in data["runs"][0]["curve"]) + " |",
        "|---|" + "---|" * len(data["runs"][0]["curve"]),
    ]
    for r in data["runs"]:
        curves.append(
            f"| {r['algorithm']} | " + " | ".join(f"{p['pass1']:.3f}" for p in r["curve"]) + " |"
        )
    text = [
        "# GRPO, PPO and online DPO on the embedded default",
        "",
        f'Same seed ({data["seed"]}), {data["steps"]} steps each, `cluster.mode = "local"`, '
        f"held-out pass@1 (200 prompts, sampled) every {data['every']} steps. "
        f"{data['machine']}. Made by `bench/algorithms.py {data['argv']}`.",
        "",
        *rows,
        *curves,
        "",
        "Train loop seconds: the summed `step_seconds` (generate, score, train, push, and the "
        "in-run evaluations, which every algorithm makes alike); start-up and the before/after "
        "evaluations are left out. One run per algorithm: no repeats, so differences of a few "
        "points are within run-to-run noise.",
        *([""] + [data["note"]] if data.get("note") else []),
    ]
    (RESULTS / "algorithms.md").write_text("\n".join(text) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in data["runs"]:
        steps = [p["step"] for p in r["curve"]]
        secs = [p["seconds"] for p in r["curve"]]
        acc = [p["pass1"] for p in r["curve"]]
        axes[0].plot(steps, acc, marker="o", label=r["algorithm"])
        axes[1].plot(secs, acc, marker="o", label=r["algorithm"])
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training-loop seconds")
    axes[0].set_ylabel("held-out pass@1")
    axes[0].legend()
    fig.suptitle("GRPO, PPO, online DPO: embedded default, same seed")
    fig.tight_layout()
    fig.savefig(RESULTS / "algorithms.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/caravela-bench-algorithms"))
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="another override for every run (repeatable)",
    )
    ap.add_argument("--render", action="store_true", help="only rewrite .md/.png from .json")
    ap.add_argument("--note", default="", help="a line on the conditions, kept in the .json")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render:
        data = json.loads((RESULTS / "algorithms.json").read_text())
        if args.note:
            data["note"] = args.note
            (RESULTS / "algorithms.json").write_text(json.dumps(data, indent=2))
        render(data)
        return
    runs = []
    for name in args.algorithms:
        print(f"{name}: running {args.steps} steps", flush=True)
        runs.append(run_one(name, args.steps, args.every, args.seed, args.runs / name, args.extra))
        r = runs[-1]
        print(
            f"{name}: pass@1 {r['before']['accuracy']:.3f} -> {r['after']['accuracy']:.3f}"
            f" in {r['wall_seconds']:.0f} s",
            flush=True,
        )
    data = {
        "steps": args.steps,
        "every": args.every,
        "seed": args.seed,
        "runs": runs,
        "argv": " ".join(sys.argv[1:]),
        "note": args.note,
        "machine": f"{os.cpu_count()} CPU cores (shared, loaded)",
    }
    (RESULTS / "algorithms.json").write_text(json.dumps(data, indent=2))
    render(data)


if __name__ == "__main__":
    main()
