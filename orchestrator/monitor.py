"""Live metrics for the Ray dashboard: the run's step metrics and, on GPU nodes, NVML readings.

Both go out as ``ray.util.metrics`` gauges, which every node's Ray metrics agent serves
in Prometheus format (``ray start --metrics-export-port``; the dashboard's metrics view
and Grafana read them from there). Names are ``caravela_<metric>`` (Ray exports them as
``ray_caravela_<metric>``); per-env metrics carry
an ``env`` tag (and ``kind`` for error counts) instead of a name per env, so one panel
shows every env of the mixture::

    reward_mean/arith            -> caravela_reward_mean{env="arith"}
    reward_mean                  -> caravela_reward_mean_overall
    reward_errors/math/timeout   -> caravela_reward_errors{env="math", kind="timeout"}
    staleness/1                  -> caravela_staleness{lag="1"}
    envs/math/restarts           -> caravela_env_restarts{env="math"}
    seconds/generate             -> caravela_seconds_generate

GPU gauges (``caravela_gpu_*{node, gpu}``): memory used/total, SM utilisation, PCIe and
NVLink throughput, sampled every few seconds by one ``GpuMonitor`` actor per GPU node.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

# metric prefix -> tag names of the path parts after it
TAGGED: dict[str, tuple[str, ...]] = {
    "reward_mean": ("env",),
    "reward_errors": ("env", "kind"),
    "staleness": ("lag",),
}
_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """A step-metric key as (Prometheus name, tags)."""
    head, *rest = key.split("/")
    tags = TAGGED.get(head)
    if tags is not None and len(rest) == len(tags):
        return f"caravela_{head}", dict(zip(tags, rest, strict=True))
    if tags is not None and not rest:  # the all-env figure: a gauge's tag keys are fixed
        return f"caravela_{head}_overall", {}
    if head == "envs" and len(rest) >= 2:  # envs/<env>/<counter...>: the env's pool counters
        return "caravela_env_" + _BAD.sub("_", "_".join(rest[1:])), {"env": rest[0]}
    return "caravela_" + _BAD.sub("_", key.replace("/", "_")), {}


class Gauges:
    """``ray.util.metrics.Gauge`` objects made on first use, one per name."""

    def __init__(self, default_tags: Mapping[str, str] | None = None) -> None:
        from ray.util.metrics import Gauge

        self._gauge_type = Gauge
        self.default_tags = dict(default_tags or {})
        self._gauges: dict[str, Any] = {}

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        if not math.isfinite(value):
            return  # a missing reading (no scored group this step) is not a value
        tags = {**self.default_tags, **(tags or {})}
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauge_type(name, description=name, tag_keys=tuple(sorted(tags)))
            self._gauges[name] = gauge
        gauge.set(float(value), tags=tags)


class RunMetrics:
    """Exports every step's metrics (the ``metrics.jsonl`` line) as gauges tagged by run."""

    def __init__(self, run: str) -> None:
        self.gauges = Gauges({"run": run})

    def record(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            name, tags = split_key(key)
            self.gauges.set(name, value, tags)


def nvml_readings(nvml: Any) -> list[dict[str, float]]:
    """One dict per GPU from an initialised ``pynvml`` module: memory, SM use, PCIe and
    NVLink throughput (bytes/s). Readings a GPU does not support are left out."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        r: dict[str, float] = {
            "gpu_memory_used_bytes": float(mem.used),
            "gpu_memory_total_bytes": float(mem.total),
            "gpu_sm_util_percent": float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
        }
        for name, counter in (("tx", "NVML_PCIE_UTIL_TX_BYTES"), ("rx", "NVML_PCIE_UTIL_RX_BYTES")):
            try:  # KB/s over the last 20 ms
                kb = nvml.nvmlDeviceGetPcieThroughput(h, getattr(nvml, counter))
                r[f"gpu_pcie_{name}_bytes_per_s"] = 1024.0 * kb
            except nvml.NVMLError:
                pass
        fields = [
            ("tx", getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", None)),
            ("rx", getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", None)),
        ]
        if all(f is not None for _, f in fields):
            try:  # cumulative KiB over all links; the monitor turns it into a rate
                values = nvml.nvmlDeviceGetFieldValues(h, [f for _, f in fields])
                for (name, _), v in zip(fields, values, strict=True):
                    if v.nvmlReturn == 0:
                        r[f"gpu_nvlink_{name}_kib_total"] = float(v.value.ullVal)
            except nvml.NVMLError:
                pass
        out.append(r)
    return out


class GpuMonitor:
    """Samples this node's GPUs with NVML every ``interval_s`` into gauges; one per GPU node
    (``start_gpu_monitors``). ``nvml`` is the ``pynvml`` module (nvidia-ml-py)."""

    def __init__(self, node: str, interval_s: float = 5.0, nvml: Any = None) -> None:
        if nvml is None:
            import importlib

            nvml = importlib.import_module("pynvml")  # nvidia-ml-py, in the gpu extra
        nvml.nvmlInit()
        self.nvml, self.node, self.interval_s = nvml, node, interval_s
        self.gauges = Gauges({"node": node})
        self._last: dict[tuple[int, str], tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self, now: Callable[[], float] | None = None) -> list[dict[str, float]]:
        """Read every GPU once, set the gauges, return the readings (NVLink as rates)."""
        import time

        t = (now or time.monotonic)()
        readings = nvml_readings(self.nvml)
        for gpu, r in enumerate(readings):
            for key in [k for k in r if k.endswith("_kib_total")]:
                total = r.pop(key)
                prev = self._last.get((gpu, key))
                self._last[(gpu, key)] = (t, total)
                if prev is not None and t > prev[0]:
                    rate = key.replace("_kib_total", "_bytes_per_s")
                    r[rate] = 1024.0 * (total - prev[1]) / (t - prev[0])
            for key, value in r.items():
                self.gauges.set(f"caravela_{key}", value, {"gpu": str(gpu)})
        return readings

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self) -> None:
        self._stop.set()


def start_gpu_monitors(interval_s: float = 5.0) -> list[Any]:
    """One ``GpuMonitor`` actor on every alive Ray node with GPUs (none on CPU clusters)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0)(GpuMonitor)
    return [
        actor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(n["NodeManagerAddress"], interval_s)
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("GPU", 0) > 0
    ]
