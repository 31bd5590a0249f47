"""Step metrics and GPU readings as Ray metrics, read back from a real Ray node's Prometheus
endpoint. NVML is faked (no GPU on this machine); everything else is real."""

import socket
import time
import urllib.request
from types import SimpleNamespace

import pytest

from orchestrator.monitor import GpuMonitor, nvml_readings, split_key


def test_per_env_keys_become_tags():
    assert split_key("reward_mean/arith") == ("caravela_reward_mean", {"env": "arith"})
    assert split_key("reward_errors/math/timeout") == (
        "caravela_reward_errors",
        {"env": "math", "kind": "timeout"},
    )
    assert split_key("envs/math/errors/timeout") == (
        "caravela_env_errors_timeout",
        {"env": "math"},
    )
    assert split_key("staleness/1") == ("caravela_staleness", {"lag": "1"})
    assert split_key("seconds/generate") == ("caravela_seconds_generate", {})
    assert split_key("weight_sync/probe_mean_diff") == ("caravela_weight_sync_probe_mean_diff", {})
    assert split_key("reward_mean") == ("caravela_reward_mean_overall", {})


class FakeNvml:
    """The slice of pynvml's API the monitor calls, for two GPUs (mocked: no GPU here)."""

    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.nvlink_kib = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        if h == 1:
            raise self.NVMLError("not supported")
        return 100 + counter

    def nvmlDeviceGetFieldValues(self, h, fields):
        return [
            SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=self.nvlink_kib + f))
            for f in fields
        ]


def test_nvml_readings_per_gpu_leave_out_unsupported_counters():
    gpu0, gpu1 = nvml_readings(FakeNvml())
    assert gpu0["gpu_memory_used_bytes"] == 2**30 and gpu1["gpu_sm_util_percent"] == 51
    assert gpu0["gpu_pcie_tx_bytes_per_s"] == 100 * 1024
    assert "gpu_pcie_tx_bytes_per_s" not in gpu1  # unsupported: absent, not 0


@pytest.fixture(scope="module")
def ray_metrics(ray_token):
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        num_cpus=1,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 500},
        logging_level="warning",
    )
    yield port
    ray.shutdown()


def scrape(port: int, needle: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        lines = [x for x in body.decode().splitlines() if x.startswith(needle)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def test_step_metrics_reach_the_prometheus_endpoint_tagged_by_env(ray_metrics):
    from orchestrator.monitor import RunMetrics

    RunMetrics("t1").record(  # as build_batch writes them: per env first, then overall
        {
            "reward_mean/arith": 0.25,
            "reward_errors/math/timeout": 3.0,
            "reward_mean": 0.25,
            "reward_errors": 3.0,
            "groups_kept": float("nan"),
        }
    )
    (line,) = scrape(ray_metrics, "ray_caravela_reward_mean{")
    assert 'env="arith"' in line and 'run="t1"' in line and line.endswith(" 0.25")
    (line,) = scrape(ray_metrics, "ray_caravela_reward_errors{")
    assert 'env="math"' in line and 'kind="timeout"' in line and line.endswith(" 3.0")
    (line,) = scrape(ray_metrics, "ray_caravela_reward_mean_overall{")
    assert line.endswith(" 0.25")
    assert not scrape(ray_metrics, "ray_caravela_groups_kept{", timeout=2)  # NaN: not a value


def test_gpu_monitor_exports_memory_and_nvlink_rate(ray_metrics):
    nvml = FakeNvml()
    mon = GpuMonitor("node-a", interval_s=3600, nvml=nvml)
    try:
        mon.sample(now=lambda: 10.0)
        nvml.nvlink_kib = 2048  # 2 MiB more over 2 s
        (gpu0, _) = mon.sample(now=lambda: 12.0)
        assert gpu0["gpu_nvlink_tx_bytes_per_s"] == 1024 * 1024
        lines = scrape(ray_metrics, "ray_caravela_gpu_memory_used_bytes{")
        tagged = {('gpu="0"' in x, 'node="node-a"' in x) for x in lines}
        assert tagged == {(True, True), (False, True)}  # both GPUs, this node
        assert scrape(ray_metrics, "ray_caravela_gpu_nvlink_tx_bytes_per_s{")
    finally:
        mon.close()
