"""Where a local Ray cluster keeps its files: under the run directory when Ray's unix
sockets fit there, else in a fresh temporary directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.cluster import _temp_dir

LONGEST_SOCKET = "/session_2026-12-01_23-04-27_446266_4194304/sockets/dash_MetricsHead"
"""The longest path Ray 2.60 puts under its temp dir: the dashboard's MetricsHead socket in
a session named with a 7-digit pid."""


@pytest.mark.parametrize("length", [20, 38, 39, 40, 45, 47, 80])
def test_every_socket_path_fits_in_107_bytes(length):
    base = Path("/tmp/caravela-test-temp-dir")
    pad = length - len(f"{base}/run/ray") - 1
    run_dir = base / ("x" * pad) / "run" if pad > 0 else Path("/tmp/r")
    try:
        temp = _temp_dir(run_dir)
        assert len(temp + LONGEST_SOCKET) <= 107, temp
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree("/tmp/r", ignore_errors=True)
        if "caravela-ray-" in temp:
            Path(temp).rmdir()
