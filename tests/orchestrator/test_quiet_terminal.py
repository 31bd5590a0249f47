"""What a newcomer's terminal shows for ``caravela run`` on the local Ray cluster: Caravela's
own lines, not the actors' "Loading weights" bars or torch's c10d hostname warnings: those
stay in the run's Ray logs, whose place the run prints once. Ray's "Failed to determine
local IP" warning is not written at all (the local node's address is 127.0.0.1). A real
run in a subprocess (the test runs in the loopback-only namespace ``make test`` provides,
like ``make run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOISE = {
    "ray": "Failed to determine local IP",
    "c10d": "[c10d] The hostname of the client socket cannot be retrieved",
    "bar": "Loading weights",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, Path]:
    """The terminal output (stdout and stderr as one stream) of a 1-step run, and its dir."""
    out = tmp_path_factory.mktemp("quiet") / "run"
    caravela = Path(sys.executable).with_name("caravela")
    args = ["--set", "steps=1", "--set", f"output_dir='{out}'", "--set", "eval.num_prompts=4"]
    args += ["--set", "eval.k=2", "--set", "rollout.prompts_per_step=4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HF_HUB_DIS"))}
    proc = subprocess.run(
        [str(caravela), "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout, out


def test_actor_and_ray_noise_stays_in_the_logs(run):
    terminal, run_dir = run
    shown = [line for line in terminal.splitlines() if any(n in line for n in NOISE.values())]
    actors = [line for line in shown if "pid=" in line]  # Ray prefixes forwarded actor lines
    assert not actors and not [line for line in shown if NOISE["ray"] in line], "\n".join(shown)
    said = [line for line in terminal.splitlines() if line.startswith("Ray logs")]
    assert len(said) == 1, terminal
    logs = Path(said[0].rpartition(": ")[2])
    assert logs.name == "logs" and logs.parent.name.startswith("session_")
    kept = "".join(f.read_text(errors="replace") for f in logs.glob("*.[oe][ur][tr]"))
    assert NOISE["bar"] in kept  # where the user was pointed
    # Ray's warning is gone altogether: the local node's address is 127.0.0.1, no probe
    assert NOISE["ray"] not in kept
    assert "before [heldout]:" in terminal and "after [heldout]:" in terminal


def test_the_driver_draws_no_loading_bar(run):
    terminal, _ = run
    assert NOISE["bar"] not in terminal
