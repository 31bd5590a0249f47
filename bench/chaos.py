"""Chaos bench: a run's own processes killed (SIGKILL) and hung (SIGSTOP) by PID while it
trains, at seeded random steps, and what the run made of it.

The faults come from outside the run's code: a thread of the driver process watches
``<run>/metrics.jsonl`` grow and, when the run reaches a fault's step (plus a seeded delay
into it), finds its victim among the driver's descendant processes by process title
(Ray names an actor's process ``ray::<Class>``) and signals it:

- ``engine``: an engine actor (``ray::DirTransformersEngine`` / ``ray::VLLMEngine``), SIGKILL;
- ``hang``: an engine actor, SIGSTOP (never continued: the run must notice and replace it);
- ``pool``: an env pool host (``ray::PoolHost``: every env pool of its node), SIGKILL;
- ``worker``: an env worker process (a child of a pool host), SIGKILL;
- ``trainer``: a trainer rank (``ray::TrainerRank``), SIGKILL.

``python bench/chaos.py`` runs the default 200-step run twice, side by side in time: once
unfaulted and once with ``--faults`` faults spread over every kind, and writes
``bench/results/chaos.{json,md}``: faults injected and survived, wall time against the
unfaulted run, held-out pass@1 after, and the accounting checks of ``check_accounting``
(the faulted run drew, step by step, exactly the unfaulted run's prompts; every step is
logged once; every completion of every step was scored or counted as an error).
``tests/orchestrator/test_chaos.py`` runs a 40-step version with one fault of each kind.
Run it inside a loopback-only network namespace (it starts Ray):
``unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/chaos.py'``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("engine", "hang", "pool", "worker", "trainer")
TITLES = {
    "engine": ("ray::DirTransformersEngine", "ray::VLLMEngine"),
    "hang": ("ray::DirTransformersEngine", "ray::VLLMEngine"),
    "pool": ("ray::PoolHost",),
    "trainer": ("ray::TrainerRank",),
}


@dataclass
class Fault:
    step: int
    """Fired once the run has logged this many steps."""
    delay: float
    """Seconds after that, into the next step."""
    kind: str
    pid: int = 0
    fired_at: float = 0.0


def plan(seed: int, kinds: Sequence[str], first: int, last: int) -> list[Fault]:
    """One fault per entry of ``kinds``, at seeded random steps in ``[first, last]`` (no two
    at the same step) with a seeded delay of 0-2 s into it."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(first, last + 1), len(kinds)))
    order = list(kinds)
    rng.shuffle(order)
    return [Fault(s, rng.uniform(0.0, 2.0), k) for s, k in zip(steps, order, strict=True)]


def victims(kind: str, root: int | None = None) -> list[int]:
    """PIDs of processes of ``kind`` among the descendants of ``root`` (this process), alive
    and not stopped."""
    import psutil

    out = []
    for p in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if p.status() == psutil.STATUS_STOPPED:
                continue
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not cmd:
            continue
        if kind == "worker":
            parent = p.parent()
            if "caravela_env_worker" in " ".join(cmd) and parent is not None:
                pcmd = parent.cmdline()
                if pcmd and pcmd[0].startswith("ray::PoolHost"):
                    out.append(p.pid)
        elif any(cmd[0].startswith(t) for t in TITLES[kind]):
            out.append(p.pid)
    return sorted(out)


@dataclass
class Chaos:
    """Fires ``faults`` at a run writing ``run_dir``, from a thread of this (the driver's)
    process."""

    run_dir: Path
    faults: list[Fault]
    seed: int = 0
    log: Callable[[str], Any] = print
    stopped: list[int] = field(default_factory=list)
    """PIDs left SIGSTOPped (continued and killed by ``close`` if still there)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Chaos:
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for pid in self.stopped:  # the run should have killed them; never leave one behind
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break

    @property
    def fired(self) -> list[Fault]:
        return [f for f in self.faults if f.pid]

    def _steps_logged(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        try:
            return len(path.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        rng = random.Random(self.seed)
        for fault in self.faults:
            while not self._stop.is_set() and self._steps_logged() < fault.step:
                time.sleep(0.2)
            if self._stop.wait(fault.delay):
                return
            # the victim may be restarting (not there yet): look again for up to 60 s
            deadline = time.monotonic() + 60
            while not self._stop.is_set() and time.monotonic() < deadline:
                pids = victims(fault.kind)
                if pids:
                    fault.pid = rng.choice(pids)
                    sig = signal.SIGSTOP if fault.kind == "hang" else signal.SIGKILL
                    try:
                        os.kill(fault.pid, sig)
                    except ProcessLookupError:
                        fault.pid = 0
                        continue
                    fault.fired_at = time.time()
                    if fault.kind == "hang":
                        self.stopped.append(fault.pid)
                    self.log(
                        f"chaos: {fault.kind} pid {fault.pid} ({sig.name}) at step {fault.step}"
                    )
                    break
                time.sleep(0.5)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def check_accounting(
    run_dir: Path, steps: int, per_step: int, reference: Path | None = None
) -> dict[str, Any]:
    """What ``prompts.jsonl`` and ``metrics.jsonl`` of a faulted run show: every step logged
    once; each step's prompts distinct and ``prompts_per_step`` of them; every completion
    scored or counted as an error (``items_scored + reward_errors = per_step``); the steps
    redone after a trainer restart drew the prompts they drew the first time; with a
    ``reference`` run (unfaulted, same seed), the very same prompts at every step."""
    prompts, metrics = jsonl(run_dir / "prompts.jsonl"), jsonl(run_dir / "metrics.jsonl")
    redone = jsonl(run_dir / "prompts.superseded.jsonl")
    by_step = {p["step"]: p["prompts"] for p in prompts}
    out: dict[str, Any] = {
        "steps_logged_once": [p["step"] for p in prompts] == list(range(steps))
        and [int(m["step"]) for m in metrics] == list(range(steps)),
        "prompts_distinct": all(len(set(p["prompts"])) == len(p["prompts"]) for p in prompts),
        "completions_accounted": all(
            m["items_scored"] + m["reward_errors"] == per_step for m in metrics
        ),
        "completions_errored": sum(m["reward_errors"] for m in metrics),
        "steps_redone": len(redone),
        "redone_steps_drew_the_same_prompts": all(
            by_step.get(r["step"]) == r["prompts"] for r in redone
        ),
    }
    if reference is not None:
        ref = jsonl(reference / "prompts.jsonl")
        out["same_prompts_as_unfaulted"] = [p["prompts"] for p in prompts] == [
            p["prompts"] for p in ref
        ]
    return out


def recovery(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The run totals of the recovery counters at its last step."""
    from orchestrator.report import RECOVERY

    last = metrics[-1] if metrics else {}
    return {k: last.get(k, 0.0) for k in RECOVERY}


def chaos_settings() -> list[str]:
    """Settings that make recovery quick enough to measure on one CPU machine: checkpoints
    every 10 steps bound what a trainer restart replays. The bench's one engine meets 5
    faults in a few minutes, far more than the default bound for a crash loop (3 restarts in
    30 minutes), which would retire it and end the run as designed: the bench allows 8; and
    its restart backoff, which doubles with each restart in the window (2 s default: 32 s
    before the fifth), starts at 0.5 s. A hang is noticed by the heartbeat after 10 s."""
    return [
        "inference.max_restarts=8",
        "inference.restart_backoff_s=0.5",
        "checkpoint.every_steps=10",
        "inference.heartbeat_s=2",
        "inference.heartbeat_timeout_s=10",
    ]


def run_once(run_dir: Path, sets: list[str], faults: list[Fault], seed: int) -> dict[str, Any]:
    from orchestrator.config import load_config
    from orchestrator.loop import run

    cfg = load_config(overrides=[f"output_dir='{run_dir}'", *sets])
    lines: list[str] = []
    t0 = time.perf_counter()
    with Chaos(run_dir, faults, seed, log=lines.append) as chaos:
        summary = run(cfg, log=lines.append, overwrite=True)
    wall = time.perf_counter() - t0
    metrics = jsonl(run_dir / "metrics.jsonl")
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return {
        "wall_s": wall,
        "faults": [f.__dict__ for f in chaos.faults],
        "fired": len(chaos.fired),
        "pass1_before": summary.before.pass1,
        "pass1_after": summary.after.pass1,
        "greedy_after": summary.after.greedy_acc,
        "recovery": recovery(metrics),
        "steps": cfg.steps,
        "per_step": per_step,
        "log": [
            x
            for x in lines
            if "chaos" in x or "died" in x or "quarantin" in x or "formed again" in x
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/caravela-chaos"))
    ap.add_argument("--set", action="append", default=[], help="more run settings")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kinds = ["engine"] * 3 + ["hang"] * 2 + ["pool"] * 3 + ["worker"] * 3 + ["trainer"] * 2
    faults = plan(args.seed, kinds, 5, int(args.steps * 0.9))
    sets = [f"steps={args.steps}", *chaos_settings(), *args.set]
    plain = run_once(args.out / "unfaulted", sets, [], args.seed)
    hit = run_once(args.out / "faulted", sets, faults, args.seed)
    checks = check_accounting(
        args.out / "faulted", args.steps, hit["per_step"], args.out / "unfaulted"
    )
    result = {
        "faults_planned": len(faults),
        "faults_fired": hit["fired"],
        "survived": True,  # run_once returned: the faulted run finished every step
        "wall_ratio": hit["wall_s"] / plain["wall_s"],
        "unfaulted": plain,
        "faulted": hit,
        "checks": checks,
    }
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "chaos.json").write_text(json.dumps(result, indent=2))
    rows = [
        "| | unfaulted | faulted |",
        "|---|---|---|",
        f"| wall seconds | {plain['wall_s']:.0f} | {hit['wall_s']:.0f} |",
        "| held-out pass@1 before -> after | "
        f"{plain['pass1_before']:.3f} -> {plain['pass1_after']:.3f} | "
        f"{hit['pass1_before']:.3f} -> {hit['pass1_after']:.3f} |",
        f"| faults fired | 0 | {hit['fired']} of {len(faults)} |",
        *(f"| {k} | {plain['recovery'][k]:g} | {hit['recovery'][k]:g} |" for k in hit["recovery"]),
    ]
    text = "\n".join(
        [
            f"# Chaos bench: {args.steps} steps, seed {args.seed}",
            "",
            f"Wall time faulted / unfaulted: **{result['wall_ratio']:.2f}x**.",
            "",
            *rows,
            "",
            "Accounting checks (faulted run): "
            + ", ".join(f"{k} = {v}" for k, v in checks.items()),
            "",
            "Faults: "
            + "; ".join(
                f"{f['kind']} at step {f['step']} (pid {f['pid'] or 'none found'})"
                for f in hit["faults"]
            ),
        ]
    )
    (results / "chaos.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
