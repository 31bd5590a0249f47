"""What an env may ask its build to install: every option class, in every carrier a requirement
reaches the builder by (the manifest's list, its lock file, a file the lock includes, a line
continued over several), refused before uv runs with the file and line; what the operator's
``RequirementPolicy`` allows gets through; and real builds against recording package indexes
on 127.0.0.1 show that only the configured index is ever asked. The API carrier is in
``api/test_env_requirements.py`` (it needs the API's fixtures)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from reward_envs.builder import EnvBuildError, build, prepare
from reward_envs.config import VenvIsolation
from reward_envs.manifest import load_manifest
from reward_envs.pool import EnvPool
from reward_envs.protocol import Item
from reward_envs.requirements import RequirementError, RequirementPolicy, read_env_requirements

if TYPE_CHECKING:
    from conftest import PackageIndex

Index = Callable[..., "PackageIndex"]
FOREIGN = "http://127.0.0.1:9/simple"
SCORER = "import caravela_testdep\n\n\ndef score(prompt, completion, **fields):\n"
SCORER += "    return caravela_testdep.VALUE / 42\n"

# (line, what the refusal says): every option class, in the spellings pip and uv accept
REFUSED = [
    (f"--index-url {FOREIGN}", "allow_index_urls"),
    (f"--index-url={FOREIGN}", "allow_index_urls"),
    (f"-i {FOREIGN}", "allow_index_urls"),
    (f"-i{FOREIGN}", "allow_index_urls"),
    (f"\t-i\t{FOREIGN}", "allow_index_urls"),
    (f"--INDEX-URL {FOREIGN}", "allow_index_urls"),
    (f"--extra-index-url {FOREIGN}", "allow_index_urls"),
    (f"--default-index={FOREIGN}", "allow_index_urls"),
    ("--no-index", "package index the server's operator configured"),
    ("--find-links /tmp/wheels", "allow_find_links"),
    ("-f/tmp/wheels", "allow_find_links"),
    (f"--find-links={FOREIGN}", "allow_find_links"),
    ("--trusted-host 127.0.0.1", "turns off TLS checks"),
    ("-r other.txt", "allow_includes"),
    ("--requirement=other.txt", "allow_includes"),
    ("-c constraints.txt", "allow_includes"),
    ("--constraint constraints.txt", "allow_includes"),
    ("-e .", "editable"),
    ("--editable=git+https://example.org/x.git", "editable"),
    ("--pre", "pip option --pre"),
    ("caravela-testdep @ https://example.org/caravela_testdep-1.0-py3-none-any.whl", "URL"),
    ("caravela-testdep@https://example.org/x.whl", "URL"),
    ("https://example.org/caravela_testdep-1.0-py3-none-any.whl", "URL"),
    ("git+https://example.org/caravela-testdep.git", "URL or VCS"),
    ("file:///tmp/caravela_testdep-1.0-py3-none-any.whl", "URL"),
    ("./vendored/caravela-testdep", "local path"),
    ("/opt/wheels/caravela_testdep-1.0-py3-none-any.whl", "local path"),
    ("caravela_testdep-1.0-py3-none-any.whl", "local path or archive"),
    ("caravela-testdep-1.0.tar.gz", "local path or archive"),
    (f"caravela-testdep==1.0 --extra-index-url {FOREIGN}", "allow_index_urls"),
    (f"caravela-testdep==1.0\t--index-url={FOREIGN}", "allow_index_urls"),
    ("caravela-testdep==1.0 -r other.txt", "allow_includes"),
    ("caravela-testdep==1.0 --config-settings=a=b", "pip option --config-settings"),
    ("caravela-testdep==${VERSION}", "environment variable"),
    ("caravela-testdep==1.0 --hash=md5:0123", "sha256, sha384 or sha512"),
    ("caravela-testdep===", "not a requirement"),
]


def make_env(where: Path, requirements: list[str] | None = None, lock: str | None = None) -> Path:
    env = where / "needsdep"
    env.mkdir(parents=True, exist_ok=True)
    toml = 'name = "needsdep"\nversion = "1"\nentry_point = "env:score"\n'
    if requirements is not None:
        toml += "requirements = [" + ", ".join(f"'''{r}'''" for r in requirements) + "]\n"
    if lock is not None:
        toml += f'lock = "{lock}"\n'
    (env / "caravela-env.toml").write_text(toml)
    (env / "env.py").write_text(SCORER)
    return env


def score_once(env: Path, built, log_dir: Path) -> float | None:
    pool = EnvPool(load_manifest(env), built, workers=1, log_dir=log_dir)
    try:
        (r,) = pool.score([Item("p", "c")])
    finally:
        pool.close()
    assert r.error is None, r.error
    return r.score


# -- every option class, in every file carrier --------------------------------------------------


@pytest.mark.parametrize(("line", "why"), REFUSED, ids=[r[0] for r in REFUSED])
def test_manifest_list_refuses(tmp_path: Path, line: str, why: str) -> None:
    env = make_env(tmp_path, requirements=["sympy==1.14.0", line])
    with pytest.raises(ValueError, match=r"caravela-env\.toml") as e:
        load_manifest(env)
    assert "requirements[1]" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize(("line", "why"), REFUSED, ids=[r[0] for r in REFUSED])
def test_lock_file_refuses_before_uv_runs(tmp_path: Path, line: str, why: str) -> None:
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text(f"# compiled\nsympy==1.14.0\n{line}\n")
    store = tmp_path / "store"
    with pytest.raises(EnvBuildError, match=r"env 'needsdep': refused before building") as e:
        build(env, store)
    assert "requirements.lock:3" in str(e.value) and why in str(e.value)
    assert not store.exists()  # refused before the store was touched, let alone uv run


@pytest.mark.parametrize(("line", "why"), REFUSED, ids=[r[0] for r in REFUSED])
def test_included_file_refuses(tmp_path: Path, line: str, why: str) -> None:
    """With includes allowed, the included file is read with the same rules."""
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text("sympy==1.14.0\n-r deps/more.txt\n")
    (env / "deps").mkdir()
    (env / "deps" / "more.txt").write_text(f"\n\n\n{line}\n")
    policy = RequirementPolicy(allow_includes=True)
    if line.startswith(("-r ", "--requirement", "-c ", "--constraint")):
        why = "cannot read deps/"  # allowed as an include; the file it names does not exist
    with pytest.raises(RequirementError, match=r"deps/more\.txt:4") as e:
        read_env_requirements(env, [], "requirements.lock", policy)
    assert why in str(e.value)


def test_continued_lines_are_one_line_and_report_its_first(tmp_path: Path) -> None:
    env = make_env(tmp_path, lock="requirements.lock")
    lock = env / "requirements.lock"
    lock.write_text(
        f"sympy==1.14.0 \\\n    --hash=sha256:{'a' * 64} \\\n    --index-url {FOREIGN}\n"
    )
    with pytest.raises(RequirementError, match=r"requirements\.lock:1: .*allow_index_urls"):
        read_env_requirements(env, [], "requirements.lock")
    lock.write_text(f"sympy==1.14.0\n--extra-index-url \\\n  {FOREIGN}\n")
    with pytest.raises(RequirementError, match=r"requirements\.lock:2: .*allow_index_urls"):
        read_env_requirements(env, [], "requirements.lock")


def test_a_compiled_lock_reads_as_its_requirements(tmp_path: Path) -> None:
    """``uv pip compile --generate-hashes`` output: comments, continuations, markers, hashes."""
    h1, h2, h3 = "1" * 64, "2" * 64, "3" * 64
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text(
        "# This file was autogenerated by uv via the following command:\n"
        "#    uv pip compile --generate-hashes requirements.in\n"
        "mpmath==1.3.0 \\\n"
        f"    --hash=sha256:{h1} \\\n"
        f"    --hash=sha256:{h2}\n"
        "    # via sympy\n"
        "sympy==1.14.0 ; python_version >= '3.9' \\\n"
        f"    --hash=sha256:{h3}\n"
        "Pint[numpy]>=0.24,<0.25  # trailing comment\n"
    )
    reqs = read_env_requirements(env, ["ignored==1"], "requirements.lock")
    assert reqs.requirements == [
        f"mpmath==1.3.0 --hash=sha256:{h1} --hash=sha256:{h2}",
        f'sympy==1.14.0; python_version >= "3.9" --hash=sha256:{h3}',
        "Pint[numpy]<0.25,>=0.24",
    ]
    assert reqs.files == ["requirements.lock"] and reqs.index_url is None


# -- what the operator allows ---------------------------------------------------------------


def test_allowed_index_find_links_and_includes_pass_only_as_allowed(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    (wheels / "team").mkdir(parents=True)
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text(
        "-i http://mirror.example/simple/\n"
        "--extra-index-url=http://extra.example/simple\n"
        f"--find-links {wheels / 'team'}\n"
        "-r more.txt\n-c pins.txt\nsympy\n"
    )
    (env / "more.txt").write_text("mpmath\n")
    (env / "pins.txt").write_text("mpmath<2\n")
    with pytest.raises(RequirementError, match=r"requirements\.lock:1"):
        read_env_requirements(env, [], "requirements.lock")  # the default allows none of it
    policy = RequirementPolicy(
        allow_index_urls=["http://mirror.example/simple", "http://extra.example/simple/"],
        allow_find_links=[wheels],
        allow_includes=True,
    )
    reqs = read_env_requirements(env, [], "requirements.lock", policy)
    assert (reqs.index_url, reqs.extra_index_urls) == (
        "http://mirror.example/simple/",
        ["http://extra.example/simple"],
    )
    assert reqs.find_links == [str(wheels / "team")]
    assert (reqs.requirements, reqs.constraints) == (["mpmath", "sympy"], ["mpmath<2"])
    assert reqs.files == ["requirements.lock", "more.txt", "pins.txt"]

    lock = env / "requirements.lock"
    for line, where in [
        ("-i http://mirror.example/simple/other", "requirements.lock:1"),
        (f"--find-links {tmp_path}", "requirements.lock:1"),
        ("-r ../outside.txt", "outside the env directory"),
    ]:
        lock.write_text(line + "\n")
        with pytest.raises(RequirementError, match=where):
            read_env_requirements(env, [], "requirements.lock", policy)


def test_includes_stay_in_the_env_dir_and_end(tmp_path: Path) -> None:
    policy = RequirementPolicy(allow_includes=True)
    env = make_env(tmp_path, lock="a.txt")
    (tmp_path / "secret.txt").write_text("sympy\n")
    (env / "link.txt").symlink_to(tmp_path / "secret.txt")
    (env / "a.txt").write_text("-r link.txt\n")
    with pytest.raises(RequirementError, match=r"a\.txt:1 names 'link\.txt', which is outside"):
        read_env_requirements(env, [], "a.txt", policy)
    (env / "a.txt").write_text("-r b.txt\n")
    (env / "b.txt").write_text("sympy\n--requirement a.txt\n")
    with pytest.raises(RequirementError, match=r"b\.txt:2: includes form a cycle \(a\.txt -> b"):
        read_env_requirements(env, [], "a.txt", policy)
    for i in range(12):
        (env / f"d{i}.txt").write_text(f"-r d{i + 1}.txt\n")
    (env / "a.txt").write_text("-r d0.txt\n")
    with pytest.raises(RequirementError, match="nested more than 8 deep"):
        read_env_requirements(env, [], "a.txt", policy)
    env2 = make_env(tmp_path / "x", lock="../../secret.txt")
    with pytest.raises(ValueError, match="relative to the env directory"):
        load_manifest(env2)


def test_policy_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="not an http"):
        RequirementPolicy(allow_index_urls=["ftp://x"])
    with pytest.raises(ValueError, match="absolute"):
        RequirementPolicy(allow_find_links=[Path("wheels")])


# -- real builds: which index does uv ask? ------------------------------------------------------


def test_a_foreign_index_in_a_lock_gets_no_request(
    tmp_path: Path, package_index: Index, testdep_wheel: Path, uv_cache: Path
) -> None:
    foreign = package_index(testdep_wheel)
    env = make_env(tmp_path, lock="requirements.lock")
    store = tmp_path / "store"
    for text in [
        f"--index-url {foreign.simple}\ncaravela-testdep==1.0\n",
        f"caravela-testdep==1.0 --extra-index-url {foreign.simple}\n",
        f"caravela-testdep==1.0 \\\n  --hash=sha256:{'0' * 64} \\\n  -i {foreign.simple}\n",
    ]:
        (env / "requirements.lock").write_text(text)
        with pytest.raises(EnvBuildError, match=r"requirements\.lock:1: .*allow_index_urls"):
            build(env, store, policy=RequirementPolicy(index_url=foreign.simple + "-not"))
    (env / "requirements.lock").write_text("-r inc.txt\n")
    (env / "inc.txt").write_text(f"caravela-testdep\n--find-links {foreign.url}/files/\n")
    with pytest.raises(EnvBuildError, match=r"inc\.txt:2: .*allow_find_links"):
        build(env, store, policy=RequirementPolicy(allow_includes=True))
    assert foreign.requests == []
    assert not store.exists() and not uv_cache.exists()  # uv never ran


def test_an_allowed_index_in_a_lock_is_used_through_a_run_config(
    tmp_path: Path, package_index: Index, testdep_wheel: Path, uv_cache: Path
) -> None:
    """The ``[[envs]]`` isolation's ``requirements`` policy reaches the builder."""
    index = package_index(testdep_wheel)
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text(f"--index-url {index.simple}\ncaravela-testdep==1.0\n")
    policy = {"allow_index_urls": [index.simple]}
    isolation = VenvIsolation(store=tmp_path / "store", requirements=policy)
    built = prepare(env, isolation)
    assert "/simple/caravela-testdep/" in index.requests
    assert any(r.startswith("/files/caravela_testdep-1.0") for r in index.requests)
    assert score_once(env, built, tmp_path / "logs") == 1.0


def test_uv_and_pip_settings_outside_caravela_are_ignored(
    tmp_path: Path,
    package_index: Index,
    testdep_wheel: Path,
    uv_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Index variables and config files (which uv would prefer to ``--default-index``)
    point at a foreign index holding the same wheel: only the operator's index is asked."""
    ours, foreign = package_index(testdep_wheel), package_index(testdep_wheel)
    for var in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_INDEX_URL"):
        monkeypatch.setenv(var, foreign.simple)
    for var in ("UV_EXTRA_INDEX_URL", "UV_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(var, foreign.simple)
    monkeypatch.setenv("UV_FIND_LINKS", f"{foreign.url}/files/")
    config = tmp_path / "uv.toml"
    config.write_text(f'extra-index-url = ["{foreign.simple}"]\n')
    monkeypatch.setenv("UV_CONFIG_FILE", str(config))
    monkeypatch.chdir(tmp_path)  # uv.toml in the working directory, too
    env = make_env(tmp_path, requirements=["caravela-testdep==1.0"])
    (env / "uv.toml").write_text(config.read_text())
    (env / "pyproject.toml").write_text(f'[tool.uv]\nindex-url = "{foreign.simple}"\n')
    built = build(env, tmp_path / "store", policy=RequirementPolicy(index_url=ours.simple))
    assert foreign.requests == []
    assert "/simple/caravela-testdep/" in ours.requests
    assert score_once(env, built, tmp_path / "logs") == 1.0


def test_hashes_pass_through_to_uv(tmp_path: Path, testdep_wheel: Path) -> None:
    wheelhouse = testdep_wheel.parent
    digest = hashlib.sha256(testdep_wheel.read_bytes()).hexdigest()
    env = make_env(tmp_path, lock="requirements.lock")
    (env / "requirements.lock").write_text(
        f"caravela-testdep==1.0 \\\n  --hash=sha256:{'0' * 64}\n"
    )
    with pytest.raises(EnvBuildError, match=r"(?i)hash"):
        build(env, tmp_path / "store", offline=True, wheelhouse=wheelhouse)
    (env / "requirements.lock").write_text(f"caravela-testdep==1.0 \\\n  --hash=sha256:{digest}\n")
    built = build(env, tmp_path / "store", offline=True, wheelhouse=wheelhouse)
    installed = (Path(built.python).parents[2] / "install-requirements.txt").read_text()
    assert installed == f"caravela-testdep==1.0 --hash=sha256:{digest}\n"
    assert score_once(env, built, tmp_path / "logs") == 1.0
