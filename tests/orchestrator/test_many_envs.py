"""30 reward envs in one run (``examples/configs/many_envs.toml``, written by
``examples/many_envs/make_envs.py``): every env's prompts are drawn, every env scores in its
own venv with its own package, and every env has its metrics.

The envs must be built into the test store first (``make envs`` does it; each env's package
comes from PyPI). The run is real: a local Ray cluster, the tiny model on the transformers
engine, a trainer rank, 30 env pools in one pool host whose workers run the envs' venv
interpreters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "many_envs"
CONFIG = REPO_ROOT / "examples" / "configs" / "many_envs.toml"


def make_envs():
    spec = importlib.util.spec_from_file_location("make_envs", EXAMPLE / "make_envs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_envs"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_example_is_what_make_envs_writes():
    """The env dirs, datasets and config in the repo are make_envs.py's output, byte for byte
    (regenerating changes nothing), and they are 30 distinct envs and packages."""
    m = make_envs()
    files = m.outputs(EXAMPLE / "envs", EXAMPLE / "data", CONFIG)
    differ = [str(p) for p, text in files.items() if p.read_text() != text]
    assert not differ, f"run `python examples/many_envs/make_envs.py`; stale: {differ}"
    assert len({e.name for e in m.ENVS}) == len({e.package for e in m.ENVS}) == 30


class WorkerWatch:
    """Records the argv of every env worker process alive while the run goes (``/proc``)."""

    def __init__(self) -> None:
        self.argvs: set[tuple[str, ...]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                if b"caravela_env_worker" in argv:
                    self.argvs.add(tuple(a.decode() for a in argv if a))

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_thirty_envs_each_in_its_own_venv_in_one_run(tmp_path):
    from orchestrator.config import load_config
    from orchestrator.loop import run
    from reward_envs.builder import default_store, find_built

    m = make_envs()
    names = [e.name for e in m.ENVS]
    store = default_store()
    # asked of a fresh interpreter: once setuptools is imported (as it is by now in this
    # process) its vendored packages, inflect among them, are on sys.path
    probe = (
        "import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if not u.find_spec(m)))"
    )
    missing = subprocess.run(
        [sys.executable, "-c", probe, *(e.module for e in m.ENVS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    built = {}
    for e in m.ENVS:
        entry = find_built(EXAMPLE / "envs" / e.name, store)
        assert entry is not None, (
            f"env {e.name} is not built in {store}: run `make envs` (or `caravela env build "
            "examples/many_envs/envs/*` with CARAVELA_ENV_STORE set to that store)"
        )
        built[e.name] = entry
        # the verifier's package is in the env's venv, and nowhere Caravela could import it
        assert e.module in missing, f"{e.module} can be imported in Caravela's venv"
        site = next(Path(entry.python).parent.parent.glob("lib/python3*/site-packages"))
        dist = e.package.split("==")[0].lower().replace("-", "_")
        assert [p for p in site.iterdir() if p.name.lower().startswith(dist + "-")], (e, site)

    out = tmp_path / "run"
    cfg = load_config(
        CONFIG,
        [
            f"output_dir='{out}'",
            "steps=2",
            "rollout.prompts_per_step=60",
            "rollout.group_size=2",
            "rollout.max_new_tokens=32",
            "eval.num_prompts=4",
            "eval.k=1",
            "trainer.cpus_per_rank=1",
            "inference.backend={type='transformers', cpus_per_engine=1}",
        ],
    )
    lines: list[str] = []
    with WorkerWatch() as watch:
        run(cfg, log=lines.append)
    log = "\n".join(lines)

    # prompts from every env (seed 0 draws each of the 30 within the 120 prompts)
    env_of = {}
    for e in m.ENVS:
        for line in (EXAMPLE / "data" / f"{e.name}.jsonl").read_text().splitlines():
            env_of[json.loads(line)["id"]] = e.name
    steps = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    drawn = {env_of[p] for s in steps for p in s["prompts"]}
    assert drawn == set(names), f"never drawn: {set(names) - drawn}\n{log}"

    # each env scored in its own venv: a worker ran that venv's python on that env's source
    seen = {}
    for argv in watch.argvs:
        src = argv[argv.index("--env-dir") + 1]
        seen.setdefault(src, set()).add(argv[0])
    for name, entry in built.items():
        assert seen.get(entry.src) == {entry.python}, (name, entry, seen.get(entry.src))
    assert len({b.python for b in built.values()}) == 30

    # per-env metrics: a reward mean, items scored by the env's pool, no errors
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with_mean = {k.split("/", 1)[1] for row in metrics for k in row if k.startswith("reward_mean/")}
    assert with_mean == set(names)
    last = metrics[-1]
    for name in names:
        assert last[f"envs/{name}/scored"] > 0 and last[f"envs/{name}/errors"] == 0, name
    assert last["reward_errors"] == 0


@pytest.mark.slow
def test_pools_start_in_one_call_and_one_broken_env_stops_them_all(local_ray, tmp_path):
    """Five envs of the example come up in one ``RayScorer`` call (which starts every env's
    pool before waiting for any), all in the one pool host process of the cluster's trainer
    node, their workers its children, and score. One env whose verifier cannot be imported
    fails the whole start, naming the env, and no pool host is left alive."""
    import psutil
    import ray

    from reward_envs.config import EnvSpec
    from reward_envs.pool import EnvStartError
    from reward_envs.protocol import Item
    from reward_envs.scorer import RayScorer

    m = make_envs()
    specs = [EnvSpec(name=e.name, path=EXAMPLE / "envs" / e.name, workers=1) for e in m.ENVS[:5]]
    scorer = RayScorer(specs, log_dir=tmp_path / "logs")
    try:
        (r,) = scorer.score(
            "eq-all", [Item("Q: 1+1+1 A: ", "1+1=2, 2+1=3. The answer is 3.", {"answer": "3"})]
        )
        assert r.score == 1.0 and r.error is None
        replicas = [x for xs in scorer.replicas.values() for x in xs]
        (host,) = {x.host.actor for x in replicas}  # one process for the five envs' pools
        pid = ray.get(host.pid.remote())
        workers = [w for x in replicas for w in ray.get(host.pids.remote(x.key))]
        assert len(set(workers)) == 5
        assert {psutil.Process(w).ppid() for w in workers} == {pid}
    finally:
        scorer.close()  # the pools, then the host

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "caravela-env.toml").write_text(
        'name = "broken"\nversion = "0"\nentry_point = "env:score"\nisolation = "process"\n'
    )
    (broken / "env.py").write_text("import no_such_package_here\n")
    with pytest.raises(EnvStartError, match="env 'broken': worker 0 cannot import env:score"):
        RayScorer([*specs, EnvSpec(name="broken", path=broken, workers=1)], tmp_path / "logs")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # the GCS actor table (the state API needs the dashboard, off in this cluster)
        table = ray._private.state.actors(actor_state_name="ALIVE").values()
        alive = [a for a in table if a["ActorClassName"].endswith("PoolHost")]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, alive
