"""The collective weight push (``common.transfer``) over real gloo groups, members on threads
of this process; and a transformers engine receiving through it, refusals included."""

import socket
import threading

import pytest
import torch

from common.paths import TINY_MODEL
from common.transfer import TensorMeta, TransferGroup, buckets, named, state_meta


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group(world: int) -> list[TransferGroup]:
    """``world`` members of one group, formed together (each blocks until all have joined)."""
    port, members = _port(), [None] * world

    def join(rank: int) -> None:
        members[rank] = TransferGroup("127.0.0.1", port, rank, world, timeout_s=60)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(members)
    return members  # type: ignore[return-value]


class Sender:
    """Rank 0 of a weight-push group whose only receiver is ``engine`` (joined here), pushing
    to it as the run does: the broadcast on a thread while the engine receives."""

    def __init__(self, engine, timeout_s: float = 120) -> None:
        port, opened = _port(), []
        opener = threading.Thread(
            target=lambda: opened.append(
                TransferGroup("127.0.0.1", port, 0, 2, timeout_s=timeout_s)
            )
        )
        opener.start()
        engine.join_transfer("127.0.0.1", port, 1, 2)
        opener.join()
        self.group, self.engine, self.timeout_s = opened[0], engine, timeout_s

    def push(self, version, tensors, meta, bucket_bytes):
        """The engine's metrics; asserts the sender returned whatever the engine did."""

        def send() -> None:
            self.group.send(named(tensors, meta), meta, bucket_bytes)

        done = threading.Thread(target=send)
        done.start()
        try:
            return self.engine.receive_weights(version, meta, bucket_bytes)
        finally:
            done.join(timeout=self.timeout_s)
            assert not done.is_alive(), "the sender waited on a receiver"


def test_buckets_follow_the_byte_budget_and_never_split_a_tensor():
    meta = [
        TensorMeta("a", "float32", (4,)),  # 16 B
        TensorMeta("b", "float32", (4,)),  # 16 B: the bucket reaches 32 B, closes
        TensorMeta("big", "bfloat16", (100,)),  # 200 B alone
        TensorMeta("c", "int64", (1,)),
    ]
    assert buckets(meta, 32) == [[0, 1], [2], [3]]
    assert buckets(meta, 1 << 20) == [[0, 1, 2, 3]]
    assert meta[2].nbytes == 200


def test_two_receivers_get_every_tensor_in_the_announced_dtype():
    g = torch.Generator().manual_seed(0)
    state = {
        "embed": torch.randn(50, 8, generator=g),
        "norm": torch.randn(8, generator=g),
        "layer.0.w": torch.randn(8, 8, generator=g),
        "steps": torch.tensor([3, 4]),
    }
    meta = state_meta(state.items())
    meta[0] = TensorMeta.of("embed", state["embed"], torch.bfloat16)  # sent in bf16
    sender, *receivers = _group(3)
    got: list[dict[str, torch.Tensor]] = []
    threads = [
        threading.Thread(target=lambda r=r: got.append(r.receive(meta, 300))) for r in receivers
    ]
    for t in threads:
        t.start()
    sent = sender.send(named(state, meta), meta, 300)
    for t in threads:
        t.join()
    assert sent == len(buckets(meta, 300)) > 1
    for out in got:
        assert set(out) == set(state)
        assert out["embed"].dtype == torch.bfloat16
        assert torch.equal(out["embed"], state["embed"].to(torch.bfloat16))
        for n in ("norm", "layer.0.w", "steps"):
            assert out[n].dtype == state[n].dtype and torch.equal(out[n], state[n])


def test_a_group_needs_a_receiver_and_ranks_inside_it():
    with pytest.raises(ValueError, match="a sender and a receiver"):
        TransferGroup("127.0.0.1", _port(), 0, 1)
    with pytest.raises(ValueError, match="outside a weight-push group of 2"):
        TransferGroup("127.0.0.1", _port(), 2, 2)


def test_a_transformers_engine_receives_refuses_and_the_sender_never_waits():
    """A refused push (an older version, non-finite values, wrong shape) is still received
    whole: the sender returns every time, and the engine keeps its weights and version; the
    version it serves already is received and dropped (the push repeated after an engine
    died)."""
    from inference_server.transformers_backend import DirTransformersEngine
    from inference_server.weights import WeightUpdateError

    engine = DirTransformersEngine(TINY_MODEL)
    sender = Sender(engine, timeout_s=60)
    served = sorted(engine.shapes)
    state = {n: t.clone() + 0.01 for n, t in engine.model.state_dict().items() if n in served}
    meta = state_meta(state.items())

    def push(version, tensors, meta=meta):
        return sender.push(version, tensors, meta, 1 << 12)

    metrics = push(1, state)
    assert engine.version == 1 and metrics["weight_sync/buckets"] > 1
    after = engine.model.state_dict()
    assert all(torch.equal(after[n], state[n]) for n in served)
    # the version served already: a push repeated after the group lost a member, dropped
    moved = {n: t + 1.0 for n, t in state.items()}
    assert push(1, moved)["weight_sync/dropped"] == 1.0
    with pytest.raises(WeightUpdateError, match="already serves version 1"):
        push(0, moved)  # an older one is refused
    name = served[0]
    nan = dict(state, **{name: torch.full_like(state[name], float("nan"))})
    with pytest.raises(WeightUpdateError, match=r"non-finite values in \['" + name):
        push(2, nan)
    wrong = dict(state, **{name: torch.zeros(3)})
    with pytest.raises(WeightUpdateError, match="wrong shapes"):
        push(2, wrong, state_meta(wrong.items()))
    assert engine.version == 1
    assert all(torch.equal(engine.model.state_dict()[n], state[n]) for n in served)
