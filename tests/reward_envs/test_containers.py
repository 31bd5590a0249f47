"""Container isolation. docker: for real, against podman's Docker-compatible service started
by the fixture (as root, runc, in the test's loopback-only namespace), with an image imported
from a rootfs holding this machine's python3 (no registry is reachable). apptainer: the
command is rendered and checked; a real run needs the binary, which this machine lacks."""

import os
import shutil
from pathlib import Path

import pytest

from common.paths import ARITH_ENV
from reward_envs.builder import prepare
from reward_envs.config import ApptainerIsolation, DockerIsolation
from reward_envs.containers import (
    ContainerEngineError,
    apptainer_command,
    import_python_image,
    start_podman_service,
)
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item

CHAOS = Path(__file__).parent / "envs" / "chaos"
IMAGE = "caravela-test-python:3.11"


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (.ci/run installs it with apt; see DESIGN.md)")
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("the test image is built from /usr/bin/python3.11, absent here")
    tmp = tmp_path_factory.mktemp("podman")
    service, host = start_podman_service(tmp)
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    import_python_image(IMAGE, tmp)
    yield tmp
    if old is None:
        os.environ.pop("DOCKER_HOST")
    else:
        os.environ["DOCKER_HOST"] = old
    service.terminate()
    service.wait()


def containers_of(pool):
    from reward_envs.containers import client

    return [c for c in client().containers.list() if c.name.startswith(pool._slot_prefix)]


def test_docker_env_scores_in_long_lived_containers(podman, tmp_path):
    built = prepare(ARITH_ENV, DockerIsolation(image=IMAGE), tmp_path / "store")
    manifest = load_manifest(ARITH_ENV)
    pool = EnvPool(manifest, built, workers=2, log_dir=tmp_path)
    try:
        items = manifest.example_items()
        results = pool.score(items * 5)
        assert [r.score for r in results] == [e.expected_score for e in manifest.examples] * 5
        assert results[0].build_hash == built.build_hash and "-" in built.build_hash
        ctrs = containers_of(pool)
        assert len(ctrs) == 2  # one per worker, not one per item
        assert all(c.attrs["HostConfig"]["NetworkMode"] == "none" for c in ctrs)
    finally:
        pool.close()
    assert containers_of(pool) == []


def test_docker_hung_and_crashing_scorers_are_contained(podman, tmp_path):
    built = prepare(CHAOS, DockerIsolation(image=IMAGE, mem_limit="256m"), tmp_path / "store")
    pool = EnvPool(load_manifest(CHAOS), built, workers=1, log_dir=tmp_path)
    try:
        (before,) = [c.id for c in containers_of(pool)]
        out = pool.score([Item("p", c) for c in ("busy", "ok", "exit", "ok", "nan", "ok")])
        assert [r.error_kind for r in out] == ["timeout", None, "crash", None, "bad_value", None]
        assert [r.score for r in out if r.error is None] == [1.0, 1.0, 1.0]
        assert [c.id for c in containers_of(pool)] == [before]  # restarted inside, not replaced
    finally:
        pool.close()


def test_no_engine_is_a_clear_error_naming_docker_host(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(ContainerEngineError, match=r"DOCKER_HOST=unix://.*nothing\.sock"):
        prepare(ARITH_ENV, DockerIsolation(image=IMAGE), tmp_path / "store")


def test_missing_image_is_a_clear_error(podman, tmp_path):
    with pytest.raises(ContainerEngineError, match="image 'no-such-image' is not in the engine"):
        prepare(ARITH_ENV, DockerIsolation(image="no-such-image"), tmp_path / "store")


def test_apptainer_command_is_contained_and_read_only(tmp_path):
    settings = {
        "binary": "apptainer",
        "image": "/shared/images/math.sif",
        "env_src": "/shared/envs/math",
        "shim": "/shared/store/_shim-x",
        "extra_args": '["--bind", "/scratch/data:/data:ro"]',
    }
    cmd = apptainer_command(settings, ["python3", "-m", "caravela_env_worker"])
    assert cmd[:2] == ["apptainer", "exec"] and "--containall" in cmd and "--no-home" in cmd
    assert cmd[cmd.index("--network") + 1] == "none" and "--net" in cmd
    assert "/shared/envs/math:/env:ro" in cmd and "/shared/store/_shim-x:/opt/caravela:ro" in cmd
    tail = ["--bind", "/scratch/data:/data:ro", "/shared/images/math.sif", "python3", "-m"]
    assert cmd[-6:] == [*tail, "caravela_env_worker"]


@pytest.mark.skipif(shutil.which("apptainer") is None, reason="apptainer is not installed here")
def test_apptainer_env_scores_for_real(tmp_path):  # pragma: no cover - needs the binary
    image = os.environ.get("CARAVELA_TEST_SIF")
    if not image:
        pytest.skip("set CARAVELA_TEST_SIF to a .sif with python3 to run this")
    built = prepare(ARITH_ENV, ApptainerIsolation(image=Path(image)), tmp_path / "store")
    manifest = load_manifest(ARITH_ENV)
    pool = EnvPool(manifest, built, workers=1, log_dir=tmp_path)
    try:
        items = manifest.example_items()
        assert [r.score for r in pool.score(items)] == [e.expected_score for e in manifest.examples]
    finally:
        pool.close()
