"""Weight-update checks an engine runs before loading (no engine needed)."""

import pytest
import torch

from inference_server.weights import WeightUpdateError, check_update


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
