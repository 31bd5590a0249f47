"""What a run leaves for a person: ``eval.json`` (held-out accuracy before/after) and
``report.png`` (reward, accuracy, step time and staleness curves at a glance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _eval_dict(r: Any) -> dict[str, float | int]:
    return {
        "accuracy": r.pass1,
        "greedy_accuracy": r.greedy_acc,
        f"pass@{r.k}": r.passk,
        "n": r.n_prompts,
        "errors": r.errors,
    }


RECOVERY = (
    "restarts/engine",
    "engines/hangs",
    "restarts/pool",
    "restarts/worker",
    "restarts/trainer",
    "requests_requeued",
    "items_rescored",
    "envs_quarantined",
)
"""The recovery counters (run totals) the fault panel of report.png draws."""


def write_report(out_dir: Path, before: Any, after: Any, history: list[dict[str, float]]) -> None:
    """``eval.json`` and ``report.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "eval.json").write_text(
        json.dumps({"before": _eval_dict(before), "after": _eval_dict(after)}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    axes[0].plot(steps, [h["reward_mean"] for h in history], lw=0.8, label="reward (batch)")
    axes[0].axhline(before.pass1, color="gray", ls=":", label=f"held-out before {before.pass1:.2f}")
    axes[0].axhline(after.pass1, color="green", ls="--", label=f"held-out after {after.pass1:.2f}")
    axes[0].set(title="reward / held-out pass@1", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [h["step_seconds"] for h in history], lw=0.8, label="step")
    for key in ("seconds/generate", "seconds/train"):
        if history and key in history[0]:
            axes[1].plot(steps, [h[key] for h in history], lw=0.8, label=key.split("/")[1])
    axes[1].set(title="seconds per step", xlabel="step")
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [h.get("groups_kept", 0) for h in history], lw=0.8, label="groups kept")
    axes[2].plot(steps, [h.get("reward_errors", 0) for h in history], lw=0.8, label="env errors")
    axes[2].set(title="groups and errors", xlabel="step")
    axes[2].legend(fontsize=7)
    for key in RECOVERY:  # run totals: a step on a line means something was recovered
        axes[3].step(steps, [h.get(key, 0) for h in history], lw=0.8, where="post", label=key)
    axes[3].set(title="faults recovered (run totals)", xlabel="step")
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=110)
    plt.close(fig)
