"""What a run leaves for a person: ``eval.json`` (held-out accuracy before/after of the
first set, and per set its curve over the run) and ``report.png`` (reward, held-out
accuracy per set, step time, groups and errors, faults recovered)."""

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


def eval_curves(
    before: dict[str, Any], after: dict[str, Any], history: list[dict[str, float]]
) -> dict[str, list[dict[str, float | int]]]:
    """Per held-out set, its evaluations in step order: at the start (step 0), those of
    ``eval.every_steps`` (the ``eval/<set>/*`` metrics of the steps that evaluated), and at
    the end (one step past the last)."""
    last = int(history[-1]["step"]) + 1 if history else 0
    curves: dict[str, list[dict[str, float | int]]] = {}
    for name in [*before, *(n for n in after if n not in before)]:
        points = []
        if name in before:
            points.append({"step": 0, **_eval_dict(before[name])})
        for h in history:
            if f"eval/{name}/pass1" in h:
                points.append(
                    {
                        "step": int(h["step"]),
                        "accuracy": h[f"eval/{name}/pass1"],
                        "greedy_accuracy": h[f"eval/{name}/greedy"],
                        "pass@k": h[f"eval/{name}/passk"],
                        "errors": int(h[f"eval/{name}/errors"]),
                    }
                )
        if name in after:
            points.append({"step": last, **_eval_dict(after[name])})
        curves[name] = points
    return curves


def write_report(
    out_dir: Path, before: dict[str, Any], after: dict[str, Any], history: list[dict[str, float]]
) -> None:
    """``eval.json`` and ``report.png`` in ``out_dir``; ``before``/``after``: set name ->
    ``EvalResult``, the first set is the headline (eval.json's ``before``/``after``)."""
    out_dir = Path(out_dir)
    first = next(iter(after))
    curves = eval_curves(before, after, history)
    report = {
        "before": _eval_dict(before.get(first, after[first])),
        "after": _eval_dict(after[first]),
        "sets": {
            name: {
                "before": _eval_dict(before[name]) if name in before else None,
                "after": _eval_dict(after[name]) if name in after else None,
                "curve": points,
            }
            for name, points in curves.items()
        },
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6))
    axes[0].plot(steps, [h["reward_mean"] for h in history], lw=0.8, label="reward (batch)")
    axes[0].set(title="reward", xlabel="step")
    axes[0].legend(fontsize=7)
    for name, points in curves.items():
        line = axes[1].plot(
            [q["step"] for q in points], [q["accuracy"] for q in points], marker=".", label=name
        )
        axes[1].plot(
            [q["step"] for q in points],
            [q["greedy_accuracy"] for q in points],
            ls=":",
            color=line[0].get_color(),
        )
    axes[1].set(title="held-out pass@1 (dotted: greedy) per set", xlabel="step")
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [h["step_seconds"] for h in history], lw=0.8, label="step")
    for key in ("seconds/generate", "seconds/train", "seconds/score_tail"):
        if history and key in history[0]:
            axes[2].plot(steps, [h[key] for h in history], lw=0.8, label=key.split("/")[1])
    axes[2].set(title="seconds per step", xlabel="step")
    axes[2].legend(fontsize=7)
    axes[3].plot(steps, [h.get("groups_kept", 0) for h in history], lw=0.8, label="groups kept")
    axes[3].plot(steps, [h.get("reward_errors", 0) for h in history], lw=0.8, label="env errors")
    axes[3].set(title="groups and errors", xlabel="step")
    axes[3].legend(fontsize=7)
    for key in RECOVERY:  # run totals: a step on a line means something was recovered
        axes[4].step(steps, [h.get(key, 0) for h in history], lw=0.8, where="post", label=key)
    axes[4].set(title="faults recovered (run totals)", xlabel="step")
    axes[4].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=110)
    plt.close(fig)
