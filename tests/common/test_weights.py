"""The weights' wire form between trainer and engines (``common.weights``)."""

import pickle

import torch

from common.weights import HostState, weights_checksum


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


def test_checksum_follows_names_and_bytes_not_order():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, dtype=torch.bfloat16)}
    assert weights_checksum(a) == weights_checksum(dict(reversed(a.items())))
    assert weights_checksum(a) == weights_checksum(HostState.of(a).tensors())
    assert weights_checksum(a) != weights_checksum({**a, "x": torch.arange(4.0) + 1e-3})
    assert weights_checksum(a) != weights_checksum({"z": a["x"], "y": a["y"]})
