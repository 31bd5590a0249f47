"""``caravela slurm render``: every shipped profile renders a script bash accepts, with the
directives a preemptible, requeueable job needs; bad requests fail before submission."""

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
            r"2 engine\(s\) x tensor_parallel_size 4 need 8 GPUs per inference node; "
            "profile 'mn5' has 4",
        ),
    ],
)
def test_bad_requests_fail_before_submission(tmp_path, sets, message):
    cfg = config(tmp_path, *sets)
    with pytest.raises((LaunchError, ValueError), match=message):
        render(cfg)


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
