"""Shared fixtures: repo paths and a small random Llama built from a config (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory):
    """Token auth on for every Ray cluster a test starts (one token per pytest run)."""
    from orchestrator.cluster import enable_token_auth, write_token

    path = write_token(tmp_path_factory.mktemp("ray") / "token")
    enable_token_auth(path)
    return path


@pytest.fixture
def random_llama():
    """A 2-layer Llama with random weights, float32, sdpa attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture
def local_ray(ray_token, tmp_path):
    """A private local Ray cluster (token auth on) whose one node is both an inference and
    a trainer node, for one test."""
    import ray

    from orchestrator.cluster import start_local

    start_local(
        tmp_path / "cluster",
        num_cpus=16,
        resources={"inference_node": 1, "trainer_node": 1},
        dashboard=False,
    )
    yield
    ray.shutdown()
