"""Weight updates shared by both backends: what an engine serves, checks, buckets, the probe.

Torch and safetensors only (no vLLM), so the transformers backend uses the same checks as
the vLLM engine. The wire form of the weights (``HostState``) and their checksum, which the
trainer shares, live in ``common.weights``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from common.weights import HostState


class WeightUpdateError(ValueError):
    """A weight update that was refused; the engine still serves the previous version."""


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the HF checkpoint in ``model_dir``."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_update(
    engine_id: str,
    current: int,
    version: int,
    shapes: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
) -> None:
    """Raise ``WeightUpdateError`` naming everything wrong with an update; sends nothing."""
    given = {n: tuple(t.shape) for n, t in state.items()}
    problems = update_problems(current, version, shapes, given)
    if version > current:  # a stale version is refused without reading the tensors
        problems += nonfinite(state)
    refuse(engine_id, current, version, problems)


def update_problems(
    current: int,
    version: int,
    shapes: Mapping[str, tuple[int, ...]],
    given: Mapping[str, tuple[int, ...]],
) -> list[str]:
    """What is wrong with an update of tensors ``given`` (name -> shape) as ``version``:
    names and shapes against the served ``shapes``, and the version (must increase)."""
    if version <= current:
        return [f"engine already serves version {current}; versions must increase"]
    unknown = sorted(set(given) - set(shapes))
    missing = sorted(set(shapes) - set(given))
    wrong = [
        f"{n}: {tuple(s)} != {shapes[n]}"
        for n, s in given.items()
        if n in shapes and tuple(s) != shapes[n]
    ]
    problems = []
    if unknown:
        problems.append(f"unknown tensors {unknown[:5]}")
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}")
    return problems


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """A problem naming the floating-point tensors of ``state`` with NaN or inf, if any."""
    # NaN and inf survive a sum (finite weights cannot overflow it): one pass, no mask tensor
    # (isfinite(t).all() took 0.3-0.8 s for 450 MB here)
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t.sum())]
    return [f"non-finite values in {bad[:5]}"] if bad else []


def refuse(engine_id: str, current: int, version: int, problems: list[str]) -> None:
    """Raise ``WeightUpdateError`` for ``problems``; nothing when there are none."""
    if problems:
        raise WeightUpdateError(
            f"update to version {version} refused ({'; '.join(problems)}); "
            f"engine {engine_id} keeps serving version {current}"
        )


def safetensors_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> Iterator[bytes]:
    """``state`` as safetensors blobs of about ``bucket_bytes`` each (a tensor is never split)."""
    from safetensors.torch import save

    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in state.items():
        bucket[name] = t.detach().to("cpu").contiguous()
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield save(bucket)
            bucket, size = {}, 0
    if bucket:
        yield save(bucket)


def served_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensors an update must carry: the checkpoint's, minus a tied LM head."""
    shapes = checkpoint_shapes(model_dir)
    if json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
"""The probe's default tolerance (mean |engine - trainer| logprob) by the dtype engines serve:
fp32 measured ~1e-6; bf16 rounding alone 0.033 on the tiny model's probe before training
(autocast trainer vs bf16 engine), so in bf16 only grossly wrong weights are caught."""


def probe_diff(
    engine_id: str,
    version: int,
    got: Sequence[Sequence[float]],
    expected: Sequence[Sequence[float]],
    tol: float,
) -> float:
    """Mean |got - expected| logprob over the probe's tokens; raises ``WeightUpdateError``
    past ``tol``. The mean, not the max: in bf16 the rounding of the logits alone moves single
    low-probability tokens by 0.2-0.3 nats on the tiny model, while wrong weights move all of
    them (the tied-head bug: 1.36 nats)."""
    diffs = [
        abs(a - b) for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True)
    ]
    diff = sum(diffs) / max(1, len(diffs))
    if diff > tol:
        raise WeightUpdateError(
            f"logprob probe failed on engine {engine_id} at version {version}: "
            f"mean |engine - trainer| = {diff:.3g} > tolerance {tol:g} (max {max(diffs):.3g}); "
            "the weights the engine serves are not the trainer's"
        )
    return diff


def as_tensors(state: Mapping[str, torch.Tensor] | HostState) -> Mapping[str, torch.Tensor]:
    return state.tensors() if isinstance(state, HostState) else state
