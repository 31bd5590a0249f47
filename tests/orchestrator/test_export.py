"""A trained model comes out of a run: ``caravela export`` writes an HF model directory from
any checkpoint (sharded, or the whole-state ``trainer.pt`` of earlier versions) whose greedy
completions are the trainer's, token for token; every run leaves its model in ``final/``;
``caravela serve`` and ``caravela eval`` take a run or a checkpoint directory as the model.
The "trainer" compared with is the run's own trainer rank (``LocalTrainerGroup``) restored
from the checkpoint, generating greedily with the weights it trains."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from common.paths import TINY_HELDOUT, TINY_MODEL
from inference_server.protocol import GenerateRequest, SamplingParams
from inference_server.tokens import encode_prompts
from inference_server.transformers_backend import DirTransformersEngine, TransformersEngine
from orchestrator.config import load_config
from orchestrator.export import export_checkpoint, served_model
from trainer.checkpoint import weights
from trainer.group import LocalTrainerGroup

pytestmark = pytest.mark.slow

CARAVELA = str(Path(sys.executable).parent / "caravela")
PROMPTS = [json.loads(x)["prompt"] for x in TINY_HELDOUT.read_text().splitlines()[:16]]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step run in one process, checkpointed after steps 2 and 3; its stdout beside it."""
    out = tmp_path_factory.mktemp("export") / "run"
    sets = [
        "cluster.mode=local",
        "steps=3",
        "checkpoint.every_steps=2",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.k=2",
        f"output_dir='{out}'",
    ]
    done = subprocess.run(
        [CARAVELA, "run", *(x for s in sets for x in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (out.parent / "stdout").write_text(done.stdout)
    return out


def greedy(engine, texts=PROMPTS):
    """Token ids and text of each prompt's greedy completion."""
    sampling = SamplingParams(n=1, temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [
        GenerateRequest(request_id=str(i), prompt_ids=ids, sampling=sampling)
        for i, ids in enumerate(encode_prompts(engine.tokenizer, texts))
    ]
    return [(r.completions[0].token_ids, r.completions[0].text) for r in engine.generate(requests)]


def trainer_engine(ckpt: Path) -> TransformersEngine:
    """The run's trainer rank restored from ``ckpt``, generating with its own model."""
    cfg = load_config(ckpt.parent.parent / "config.json")
    group = LocalTrainerGroup(cfg.model, cfg.trainer)
    assert group.load(ckpt) == json.loads((ckpt / "driver.json").read_text())["version"]
    return TransformersEngine(group.rank.model, group.rank.tok)


def same_weights(a: dict, b: dict) -> bool:
    return bool(a) and all(torch.equal(t, b[n]) for n, t in a.items())


def test_export_of_a_checkpoint_generates_the_trainers_greedy_completions(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step-000002"
    out = tmp_path / "step2"
    done = subprocess.run(
        [CARAVELA, "export", str(run_dir), "--step", "2", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    exported = load_file(out / "model.safetensors")
    assert same_weights(exported, weights(ckpt))
    assert not same_weights(exported, load_file(TINY_MODEL / "model.safetensors"))  # trained
    assert greedy(DirTransformersEngine(out)) == greedy(trainer_engine(ckpt))
    # without --step: the latest checkpoint, the run's last step, which is final/
    latest = tmp_path / "latest"
    done = subprocess.run([CARAVELA, "export", str(run_dir), str(latest)], capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(run_dir / "final" / "model.safetensors")
    assert same_weights(load_file(latest / "model.safetensors"), final)
    # never into a directory that holds something, nor from a step that is not there
    done = subprocess.run([CARAVELA, "export", str(run_dir), str(latest)], capture_output=True)
    assert done.returncode == 2 and b"not empty" in done.stderr
    done = subprocess.run(
        [CARAVELA, "export", str(run_dir), "--step", "1", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "no checkpoint of step 1; it has steps [2, 3]" in done.stderr


@pytest.mark.parametrize("sharding", ["replicate", "fsdp2"])
def test_export_reads_the_whole_state_checkpoints_of_earlier_versions(run_dir, tmp_path, sharding):
    """``trainer.pt`` as versions before sharded checkpoints wrote it (rank 0, the whole state;
    under FSDP2 gathered from the policy wrapper, so its keys start with ``model.``)."""
    trained = weights(run_dir / "checkpoints" / "step-000003")
    prefix = "model." if sharding == "fsdp2" else ""
    old = tmp_path / "old-run"
    ckpt = old / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    shutil.copy(run_dir / "config.json", old / "config.json")
    shutil.copy(run_dir / "checkpoints" / "step-000003" / "driver.json", ckpt / "driver.json")
    state = {
        "model": {prefix + k: v for k, v in trained.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 3},
        "sharding": sharding,
        "rng": torch.get_rng_state(),
        "version": 3,
    }
    torch.save(state, ckpt / "trainer.pt")
    (old / "checkpoints" / "LATEST").write_text("step-000003")
    out = export_checkpoint(ckpt, tmp_path / "out", log=lambda *_: None)
    assert same_weights(load_file(out / "model.safetensors"), trained)
    with served_model(old, log=lambda *_: None) as model_dir:  # the run dir, too
        assert same_weights(load_file(model_dir / "model.safetensors"), trained)
    assert not model_dir.exists()  # the temporary export is gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("given", ["run", "checkpoint"])
def test_serve_on_a_run_or_checkpoint_directory_answers_like_the_trainer(run_dir, given):
    """The run directory serves its final/ model (the last step's), a checkpoint directory
    its own weights (exported to a temporary directory while the server runs)."""
    ckpt = run_dir / "checkpoints" / ("step-000003" if given == "run" else "step-000002")
    path = run_dir if given == "run" else ckpt
    port = free_port()
    proc = subprocess.Popen(
        [CARAVELA, "serve", str(path), "--backend", "transformers", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == path.name
        body = {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0.0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert texts == [text for _, text in greedy(trainer_engine(ckpt))]
    if given == "checkpoint":  # the temporary export was removed when the server stopped
        exported = re.search(r"exported \S+ to (\S+)", log)
        assert exported and not Path(exported.group(1)).exists(), log


def test_eval_of_a_run_directory_scores_its_final_model(run_dir, tmp_path):
    """``caravela eval`` on the run directory repeats the run's own evaluation after
    training (which ran on the run's engines): the same weights decode greedily to the
    same accuracy on the same prompts (sampled pass@1 depends on the engines' RNG)."""
    sets = [f"model='{run_dir}'", "eval.num_prompts=8", "eval.k=2", f"output_dir='{tmp_path}'"]
    done = subprocess.run(
        [CARAVELA, "eval", *(x for s in sets for x in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_log = (run_dir.parent / "stdout").read_text()
    after = re.search(r"after \[heldout\]: (greedy \S+) .*\((\d+ held-out prompts)\)", run_log)
    evaluated = re.search(
        r"eval \[heldout\]: (greedy \S+) .*\((\d+ held-out prompts)\)", done.stdout
    )
    assert after and evaluated, (run_log, done.stdout)
    assert after.groups() == evaluated.groups(), (run_log, done.stdout)


def test_serve_and_eval_refuse_what_is_not_a_model_naming_what_they_take(tmp_path):
    for args in (["serve", str(tmp_path)], ["eval", "--set", f"model='{tmp_path}'"]):
        done = subprocess.run([CARAVELA, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode in (1, 2), done.stderr[-3000:]
        for kind in ("HF model directory", "run directory", "checkpoint"):
            assert kind in done.stderr, done.stderr
    (tmp_path / "metrics.jsonl").write_text("")  # a run that has saved nothing yet
    done = subprocess.run([CARAVELA, "serve", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no final/ model and no checkpoint yet" in done.stderr
