"""Env venvs built with the real uv, offline from a read-only wheelhouse (no network here)."""

import base64
import hashlib
import os
import zipfile

import pytest

from reward_envs.builder import EnvBuildError, build, content_hash, find_built
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item


def make_wheel(where, name="caravela_testdep", version="1.0", value=42):
    """A minimal pure-Python wheel, written by hand so the test needs no index."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        ),
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: caravela-test\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = where / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


ENV_CODE = """
import importlib.util

import caravela_testdep


def score(prompt, completion, **fields):
    leaked = [m for m in ("reward_envs", "torch", "ray") if importlib.util.find_spec(m)]
    return {"score": caravela_testdep.VALUE / 42, "info": {"leaked": leaked}}
"""


def make_env(where, name="needsdep", requirement="caravela-testdep==1.0"):
    env = where / name
    env.mkdir()
    (env / "caravela-env.toml").write_text(
        f'name = "{name}"\nversion = "1"\nentry_point = "env:score"\n'
        f'requirements = ["{requirement}"]\n'
    )
    (env / "env.py").write_text(ENV_CODE)
    return env


def test_offline_build_from_read_only_wheelhouse_runs_in_its_own_venv(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    make_wheel(wheelhouse)
    os.chmod(wheelhouse, 0o555)  # a shared, read-only wheelhouse on an air-gapped node
    env = make_env(tmp_path)
    store = tmp_path / "store"
    built = build(env, store, offline=True, wheelhouse=wheelhouse)
    assert built.python.startswith(str(store)) and find_built(env, store) == built
    pool = EnvPool(load_manifest(env), built, workers=1, log_dir=tmp_path / "logs")
    try:
        (r,) = pool.score([Item("p", "c")])
    finally:
        pool.close()
    assert r.score == 1.0 and r.build_hash == built.build_hash
    assert r.info["leaked"] == []  # no Caravela, torch or Ray inside the env's venv


def test_build_failure_names_the_env_and_the_requirement(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    env = make_env(tmp_path, requirement="caravela-missing-dep==9.9")
    with pytest.raises(EnvBuildError, match=r"env 'needsdep'.*failing: caravela-missing-dep==9.9"):
        build(env, tmp_path / "store", offline=True, wheelhouse=wheelhouse)
    assert not any((tmp_path / "store").glob("needsdep-*"))  # nothing half-built left


def test_content_hash_follows_source_not_bytecode(tmp_path):
    env = make_env(tmp_path)
    h = content_hash(env)
    (env / "__pycache__").mkdir()
    (env / "__pycache__" / "env.cpython-311.pyc").write_bytes(b"\0")
    assert content_hash(env) == h
    (env / "env.py").write_text(ENV_CODE + "\n# edited\n")
    assert content_hash(env) != h
