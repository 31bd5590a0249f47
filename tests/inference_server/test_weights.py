"""Weight-update checks and the object-store wire form (no engine needed)."""

import pickle

import pytest
import torch

from inference_server.weights import HostState, WeightUpdateError, check_update


def test_host_state_round_trips_every_dtype_bit_exactly():
    g = torch.Generator().manual_seed(0)
    state = {
        f"w.{dt}": torch.randn(5, 7, generator=g).to(dt)
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    }
    state["steps"] = torch.arange(4)
    back = pickle.loads(pickle.dumps(HostState.of(state))).tensors()
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_check_update_names_every_problem():
    shapes = {"a": (2, 2), "b": (3,)}
    good = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    check_update("e0", 0, 1, shapes, good)
    bad = {"a": torch.full((2, 2), float("inf")), "c": torch.zeros(1)}
    with pytest.raises(WeightUpdateError) as e:
        check_update("e0", 0, 1, shapes, bad)
    msg = str(e.value)
    assert "unknown tensors ['c']" in msg and "missing tensors ['b']" in msg
    assert "non-finite values in ['a']" in msg and "keeps serving version 0" in msg
