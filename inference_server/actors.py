"""Engine actors on the inference nodes: the one place the engines become Ray actors.

Placement is by the ``inference_node`` custom resource that the launcher gives
each inference node (never by hostname): each engine asks for
``1/engines_per_node`` of it, so every inference node gets exactly
``engines_per_node`` engines. On GPU nodes an engine also reserves
``gpus_per_engine`` GPUs (vLLM's ``tensor_parallel_size``; one for a transformers
engine, which moves its model there), which Ray exposes to it through
``CUDA_VISIBLE_DEVICES``; vLLM's own multiprocessing executor then runs the
tensor-parallel ranks inside that node. ``backend.type = "auto"`` becomes one of the
two here (``resolve_backend``) unless the render or the driver did already. The actors are
threaded, so many requests reach an engine at once (vLLM batches them) and a weight
update can arrive while they are in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from inference_server.config import ConcreteBackend, InferenceBackend

INFERENCE_RESOURCE = "inference_node"
ACTOR_CONCURRENCY = 1024
"""Calls one engine actor serves at once (each is a waiting thread; the engine batches)."""


class PlacementError(RuntimeError):
    """Engines cannot be placed as asked; the message says what the cluster lacks."""


def inference_nodes() -> list[dict[str, Any]]:
    """Alive Ray nodes offering the ``inference_node`` resource."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(INFERENCE_RESOURCE)]


def available() -> tuple[bool, bool]:
    """(CUDA, vllm) in this process: what ``backend.type = "auto"`` decides by. vllm counts
    when its package is found (not imported: that takes seconds)."""
    import importlib.util

    import torch

    return torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: InferenceBackend) -> ConcreteBackend:
    """``backend``, with ``auto`` made concrete for this process (``available``). A run's
    config comes resolved (``caravela slurm render`` or the driver, once); the engine
    starters call this too, for callers that did not resolve it."""
    if backend.type == "auto":
        return backend.resolve(*available())
    return backend


def engine_class(backend: ConcreteBackend) -> type:
    """The plain engine class of ``backend`` (imported only when asked for)."""
    if backend.type == "vllm":
        from inference_server.vllm_backend import VLLMEngine

        return VLLMEngine
    from inference_server.transformers_backend import DirTransformersEngine

    return DirTransformersEngine


def engine_args(
    backend: ConcreteBackend,
    dtype: str,
    seed: int,
    count: int,
    max_model_len: int | None = None,
    first: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """(engine id, constructor keywords after ``model_dir``) of ``count`` engines, numbered
    from ``first``: the same for Ray actors (``start_engines``, ``EngineSpawner.add``) and
    in-process engines (``start_local_engines``)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(first, first + count):
        if backend.type == "vllm":
            eid = f"vllm-{i}"
            kwargs: dict[str, Any] = {
                "tensor_parallel_size": backend.tensor_parallel_size,
                "gpu_memory_utilization": backend.gpu_memory_utilization,
                "cpu_kvcache_gib": backend.cpu_kvcache_gib,
                "max_model_len": max_model_len,
                "inflight_on_update": backend.inflight_on_update,
                "compile": backend.compile,
            }
        else:
            eid = f"hf-{i}"
            kwargs = {
                "batch_size": backend.batch_size,
                "threads": max(1, int(backend.cpus_per_engine)),
            }
        out.append((eid, {"engine_id": eid, "dtype": dtype, "seed": seed + i, **kwargs}))
    return out


def start_local_engines(
    backend: InferenceBackend, model_dir: Path, dtype: str = "float32", seed: int = 0
) -> dict[str, Any]:
    """One engine in this process (``cluster.mode = "local"``); id -> the engine object."""
    backend = resolve_backend(backend)
    cls = engine_class(backend)
    engines = {}
    for eid, kw in engine_args(backend, dtype, seed, 1):
        if backend.type == "transformers":
            kw["threads"] = 0  # torch's thread count is the process's: the trainer's too
        engines[eid] = cls(Path(model_dir), **kw)
    return engines


MoreArgs = Callable[[int, int], list[tuple[str, dict[str, Any]]]]
"""``(first, count) ->`` what ``engine_args`` gives for engines ``first..first+count-1``."""


class EngineSpawner:
    """Starts engine actors by id, each time with the same actor class, options and
    constructor arguments: ``start`` starts them all, the router one again after its actor
    died or hung (``spawn``); ``add`` makes ids for engines that join a run."""

    def __init__(
        self,
        actor: Any,
        model_dir: Path,
        kwargs: dict[str, dict[str, Any]],
        timeout_s: float,
        hint: str,
        more: MoreArgs | None = None,
        per_node: int = 1,
    ) -> None:
        self.actor = actor
        """The engine class as a Ray actor class, with its options."""
        self.model_dir = Path(model_dir)
        self.kwargs = kwargs
        """Engine id -> constructor keywords after ``model_dir``."""
        self.timeout_s = timeout_s
        """Seconds an engine may take to start."""
        self.hint = hint
        """What a late engine may lack, for the error."""
        self.more = more
        """Arguments of further engines (``add``); None: this spawner adds none."""
        self.per_node = per_node
        """Engines each inference node holds (``backend.engines_per_node``)."""
        self.nodes = 0
        """Inference nodes there were when the engines were first placed."""

    def add(self, n: int) -> list[str]:
        """Ids of ``n`` new engines, made like the others with the next indices (an id is
        never used twice, even after its engine left); start them with ``start(ids)``."""
        if self.more is None:
            raise ValueError("this spawner was not given the arguments of further engines")
        args = self.more(len(self.kwargs), n)
        self.kwargs.update(args)
        return [eid for eid, _ in args]

    def spawn(self, engine_id: str) -> Any:
        """A new actor for ``engine_id``, returned at once: it is ready when a call to it
        (``inflight``) answers."""
        return self.actor.remote(self.model_dir, **self.kwargs[engine_id])

    def start(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        """Engines ``ids`` (default: every one), started together; id -> handle once all
        are ready. If one is late or fails, all of them are killed and this raises."""
        import ray

        handles = {eid: self.spawn(eid) for eid in (self.kwargs if ids is None else ids)}
        waiting = {h.inflight.remote(): eid for eid, h in handles.items()}
        try:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=self.timeout_s)
            late = sorted(waiting[r] for r in set(waiting) - set(ready))
            if late:
                raise PlacementError(
                    f"engines {late} did not start within {self.timeout_s:.0f} s; {self.hint}"
                )
            ray.get(ready)  # an engine whose constructor failed raises here, with its error
        except BaseException:
            for h in handles.values():
                ray.kill(h, no_restart=True)
            raise
        return handles


def engine_spawner(
    backend: InferenceBackend,
    model_dir: Path,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int | None = None,
    timeout_s: float = 600.0,
) -> EngineSpawner:
    """What starts ``engines_per_node`` engines on every inference node (none started yet)."""
    import ray

    nodes = inference_nodes()
    if not nodes:
        raise PlacementError(
            f"no Ray node offers the {INFERENCE_RESOURCE!r} resource, so engines have nowhere "
            f"to run. Start inference nodes with `ray start ... --resources "
            f"'{{\"{INFERENCE_RESOURCE}\": 1}}'` (the SLURM launcher does), or give a local "
            f"cluster resources={{{INFERENCE_RESOURCE!r}: 1}}"
        )
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    backend = resolve_backend(backend)
    per = backend.engines_per_node
    gpus_per_engine = backend.gpus_per_engine if gpus else 0
    cls = engine_class(backend)
    opts: dict[str, Any] = {  # actor options (ray's stubs know no max_concurrency)
        "num_gpus": gpus_per_engine,
        "num_cpus": backend.cpus_per_engine,
        "resources": {INFERENCE_RESOURCE: 1.0 / per},
        "max_concurrency": ACTOR_CONCURRENCY,
    }
    args = engine_args(backend, dtype, seed, len(nodes) * per, max_model_len)
    hint = f"check that each inference node has {backend.cpus_per_engine * per:g} free CPUs" + (
        f" and {gpus_per_engine * per} GPUs" if gpus else ""
    )
    more = partial(_more_args, backend, dtype, seed, max_model_len)
    spawner = EngineSpawner(
        ray.remote(**opts)(cls), model_dir, dict(args), timeout_s, hint, more, per
    )
    spawner.nodes = len(nodes)
    return spawner


def _more_args(
    backend: ConcreteBackend, dtype: str, seed: int, max_model_len: int | None, first: int, n: int
) -> list[tuple[str, dict[str, Any]]]:
    """``engine_args`` of engines ``first..first+n-1`` (``EngineSpawner.more``)."""
    return engine_args(backend, dtype, seed, n, max_model_len, first)


def start_engines(
    backend: InferenceBackend,
    model_dir: Path,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Start ``engines_per_node`` engines on every inference node; returns id -> handle
    (``engine_spawner(...).start()``; keep the spawner to let the router restart engines)."""
    return engine_spawner(backend, model_dir, dtype, seed, max_model_len, timeout_s).start()
