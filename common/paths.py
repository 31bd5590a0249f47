"""Where the shipped assets live: the repo root, the tiny model and its task data.

The orchestrator's embedded demo run and ``caravela serve``'s default model both point here.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_ARITH = REPO_ROOT / "examples" / "tiny_arith"
TINY_MODEL = TINY_ARITH / "model"
TINY_TRAIN = TINY_ARITH / "data" / "train.jsonl"
TINY_HELDOUT = TINY_ARITH / "data" / "heldout.jsonl"
ARITH_ENV = REPO_ROOT / "reward_envs" / "builtin" / "arith"
CONFIG_DIR = REPO_ROOT / "examples" / "configs"
