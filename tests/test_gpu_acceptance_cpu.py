"""``bench/gpu_acceptance.py --device cpu --tiny``: every check of the GPU acceptance script
runs through the same code on CPU (gloo where the GPU run uses NCCL, sdpa where this torch has
no flex_attention backward on CPU) and passes, with Ray, vLLM and the service packages
import-blocked, as on a GPU image with only torch + transformers + pydantic. A real
subprocess; the suite runs in the loopback-only namespace. Nothing GPU is mocked: this is
not the GPU run, which has not happened here (no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~20 s on the 2-core machine, 60-90 s when it is loaded

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_acceptance.py"
CHECKS = [
    "fsdp2_mixed_precision",
    "packed_train_step",
    "chunked_logprobs",
    "dcp_resume",
    "engine_generate",
    "weight_push",
]
BLOCKER = """
import sys
BLOCKED = {"ray", "vllm", "fastapi", "uvicorn", "httpx", "trl", "openai", "orchestrator"}

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The script with the packages a GPU image lacks import-blocked (a sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_every_check_passes_on_cpu(tmp_path):
    out = tmp_path / "result" / "acceptance.json"
    proc = run(tmp_path, "--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    assert {"benchmark", "config", "environment", "attention", "checks", "passed"} <= set(result)
    assert result["environment"]["device"] == "cpu" and result["environment"]["gpus"] == 0
    assert list(result["checks"]) == CHECKS
    failed = {n: r for n, r in result["checks"].items() if r["status"] != "passed"}
    assert not failed, json.dumps(failed, indent=1)[-4000:]
    assert result["passed"] is True
    checks = result["checks"]
    assert checks["fsdp2_mixed_precision"]["sharded"] is True  # FSDP2 at world 1
    assert checks["fsdp2_mixed_precision"]["forward_weight_dtype"] == "torch.bfloat16"
    assert checks["packed_train_step"]["tokens_per_s"] > 0
    assert checks["dcp_resume"]["restored_max_diff"] == 0.0
    assert checks["engine_generate"]["checksum_equal"] is True
    push = checks["weight_push"]
    assert push["backend"] == "gloo" and push["checksum_sender"] == push["checksum_receiver"]
    attention = result["attention"]
    assert attention["used"] == "flex_attention" or "sdpa instead" in attention["note"]


def test_a_cpu_run_never_writes_into_bench_results(tmp_path):
    target = REPO / "bench" / "results" / "gpu_acceptance.json"
    proc = run(tmp_path, "--device", "cpu", "--tiny", "--out", str(target))
    assert proc.returncode == 2 and "outside bench/results" in proc.stderr
