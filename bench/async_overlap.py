"""Synchronous vs async (``rollout.max_staleness`` 1) distributed runs, side by side.

Run inside a loopback-only namespace:
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/async_overlap.py'``
(~3 min). Same seed and config (the embedded default, 40 steps, 32 held-out prompts),
each on a fresh local Ray cluster. Reports median step seconds, generate and train
seconds, the ratio step / max(generate, train), and held-out pass@1 before/after.
Writes ``bench/results/async_overlap.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.loop import run  # noqa: E402

STEPS = 40


def one(staleness: int, out: Path) -> dict[str, float]:
    cfg = load_config(
        overrides=[
            f"steps={STEPS}",
            "eval.num_prompts=32",
            f"rollout.max_staleness={staleness}",
            f"output_dir='{out}'",
        ]
    )
    s = run(cfg, log=lambda *_: None)
    h = s.history[3:]  # after warm-up
    med = {
        k: statistics.median(x[k] for x in h)
        for k in ("step_seconds", "seconds/generate", "seconds/train")
    }
    return {
        **med,
        "step_over_max_gen_train": med["step_seconds"]
        / max(med["seconds/generate"], med["seconds/train"]),
        "pass1_before": s.before.pass1,
        "pass1_after": s.after.pass1,
        "stale_dropped": sum(x["groups_stale_dropped"] for x in s.history),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = {f"max_staleness={k}": one(k, Path(tmp) / str(k)) for k in (0, 1)}
    res = REPO / "bench" / "results"
    (res / "async_overlap.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# sync vs async, embedded default, {STEPS} steps, 2 CPU cores",
        "",
        "| mode | step s | generate s | train s | step / max(gen, train) | stale groups dropped "
        "| pass@1 before -> after (32 prompts) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for k, m in out.items():
        lines.append(
            f"| {k} | {m['step_seconds']:.2f} | {m['seconds/generate']:.2f} | "
            f"{m['seconds/train']:.2f} | {m['step_over_max_gen_train']:.2f} | "
            f"{m['stale_dropped']:.0f} | {m['pass1_before']:.2f} -> {m['pass1_after']:.2f} |"
        )
    (res / "async_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
