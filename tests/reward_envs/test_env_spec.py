"""An env's isolation when the run config names none: what its manifest says (``venv`` for
every built-in), never Caravela's own interpreter unless ``process`` is asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from common.paths import ARITH_ENV, CONFIG_DIR
from orchestrator.config import load_config
from reward_envs.config import EnvSpec
from reward_envs.protocol import Item
from reward_envs.scorer import LocalScorer

ITEM = Item("Q: 1+1+1 A: ", "1+1=2, 2+1=3. The answer is 3.", {"answer": "3"})


def worker_interpreters(scorer: LocalScorer, env: str) -> set[str]:
    """argv[0] of each live worker process of ``env``'s pool, as the kernel has it."""
    pids = scorer.pools[env].pids()
    assert pids
    return {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode() for p in pids}


def test_a_config_without_isolation_runs_arith_in_its_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("CARAVELA_ENV_STORE", str(tmp_path / "store"))
    cfg = load_config(CONFIG_DIR / "dapo_rloo.toml")  # its [[envs]] entry names no isolation
    (spec,) = cfg.envs
    scorer = LocalScorer([spec], log_dir=tmp_path / "logs")
    try:
        (result,) = scorer.score("arith", [ITEM])
        assert result.score == 1.0
        (python,) = worker_interpreters(scorer, "arith")
    finally:
        scorer.close()
    assert Path(python).is_relative_to(tmp_path / "store"), python
    assert python.endswith("/venv/bin/python") and python != sys.executable


def test_process_isolation_only_when_asked(tmp_path):
    spec = EnvSpec.model_validate(
        {"name": "arith", "path": ARITH_ENV, "isolation": {"type": "process"}}
    )
    scorer = LocalScorer([spec], log_dir=tmp_path / "logs")
    try:
        assert worker_interpreters(scorer, "arith") == {sys.executable}
    finally:
        scorer.close()


def test_a_manifest_asking_for_a_container_needs_its_image_in_the_config(tmp_path):
    env = tmp_path / "boxed"
    env.mkdir()
    (env / "caravela-env.toml").write_text(
        'name = "boxed"\nversion = "1"\nentry_point = "env:score"\nisolation = "docker"\n'
    )
    spec = EnvSpec(name="boxed", path=env)
    with pytest.raises(ValueError, match=r"manifest asks for docker isolation.*image"):
        spec.resolved_isolation()
