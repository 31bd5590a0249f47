"""The root run configuration and its loader (TOML file + ``--set a.b=c`` overrides).

``RunConfig`` composes the per-component sections (``trainer``, ``inference``,
``envs``) with the orchestrator's own. Every default is the embedded demo: the
shipped tiny model, the arithmetic task, a short GRPO run on one machine.
Loading never imports torch, vLLM or Ray, so a typo costs milliseconds.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from common import paths
from common.config import StrictModel
from inference_server.config import InferenceConfig
from orchestrator.trackers import LoggingConfig
from reward_envs.config import EnvSpec, VenvIsolation
from slurm.config import SlurmConfig
from trainer.config import TrainerConfig

DATASET_FORMATS = (".jsonl", ".json", ".parquet")
"""File suffixes a prompt source may have (``orchestrator.data`` reads each)."""
RESERVED_FIELDS = ("prompt", "completion", "env")
"""Names a dataset's ``fields`` cannot map to: the scorer's own arguments, the env tag."""


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


class DatasetSpec(StrictModel):
    """A prompt source: a local JSONL, JSON or Parquet file of ``{"id", "prompt", "answer",
    ...}`` rows; every column besides the id and the prompt goes to the env's scorer (under
    the name ``fields`` gives it, else its own)."""

    path: Path
    """``.jsonl``, ``.json`` (an array of objects, or JSON lines) or ``.parquet`` file
    (relative paths: to the config file). ``caravela data prepare`` pre-tokenizes it."""
    env: str
    """Env that scores this dataset's completions (an ``envs[].name``)."""
    weight: float = Field(1.0, gt=0.0)
    """Relative sampling weight of this dataset in the prompt mixture."""
    prompt_field: str = Field("prompt", min_length=1)
    """Column holding the prompt text (e.g. ``question`` for GSM8K's parquet files)."""
    id_field: str = "id"
    """Column holding each row's unique id; ``""``: the file has none, ids are
    ``<file stem>-<row number>`` (stable while the file is unchanged)."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Scorer field -> the column holding it, for columns named otherwise than the env's
    scorer reads them: ``fields = { answer = "solution" }`` passes MATH's ``solution`` column
    as ``answer`` (and no longer as ``solution``); unnamed columns pass as they are. The
    fields an env needs are in its manifest (``required_fields``): a dataset lacking one is
    refused when loaded, naming it."""

    @field_validator("fields")
    @classmethod
    def _fields_are_scorer_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        for name, column in fields.items():
            if name in RESERVED_FIELDS:
                raise ValueError(
                    f"fields.{name}: {name!r} is not a scorer field (the scorer gets the "
                    "prompt and completion itself; the prompt column is prompt_field)"
                )
            if not name or not column:
                raise ValueError(f"fields: empty name in {{{name!r} = {column!r}}}")
        return fields

    @field_validator("path")
    @classmethod
    def _known_format(cls, path: Path) -> Path:
        if path.suffix.lower() not in DATASET_FORMATS:
            raise ValueError(
                f"unsupported dataset format {path.suffix!r}; use a .jsonl, .json or .parquet file"
            )
        return path


class PromptConfig(StrictModel):
    """How a prompt's text becomes the token ids the engines see
    (``inference_server.tokens.encode_prompts``), in rollouts, the pre-tokenized store and the
    held-out evaluation."""

    format: Literal["plain", "chat"] = "plain"
    """plain: BOS + ``system`` + the prompt text (a base model's raw completion). chat: the
    tokenizer's chat template over a system message (``system``) and a user message (the
    prompt text), ending with the assistant's turn; the template decides the special tokens.
    A tokenizer without a chat template is refused at start-up."""
    system: str | None = Field(None, min_length=1)
    """chat: the system message (None: none). plain: text put before every prompt as it is
    (an instruction, few-shot examples). Changing it or ``format`` re-tokenizes the
    prepared datasets (``caravela data prepare``)."""


class RolloutConfig(StrictModel):
    """How completions are sampled for each training prompt."""

    prompts_per_step: int = Field(32, ge=1)
    """Prompts per optimizer step (each gets ``group_size`` completions)."""
    group_size: int = Field(8, ge=2, le=1024)
    """Completions per prompt (G); group-relative advantages need at least 2."""
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(40, ge=1)
    """Generation cap per completion, in tokens."""
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Strings that end a completion (besides EOS), e.g. ``["\\nQ:"]`` for a few-shot format.
    The completion's text stops before the string; its token ids (trained on) and logprobs
    run to the token that completed it, as EOS is kept in the ids and dropped from the text.
    Also used by the held-out evaluation."""
    max_staleness: int = Field(0, ge=0, le=8)
    """0: synchronous, on-policy. k >= 1: generating step s+1 overlaps training step s, and
    samples from weights more than k versions behind the trainer are handled by ``stale``.
    Unset, a job rendered by ``caravela slurm render`` gets 1 (its engines and trainer ranks
    are on different nodes); one machine keeps 0."""
    stale: Literal["drop", "tis"] = "drop"
    """What happens to groups from weights more than ``max_staleness`` versions behind:
    ``drop`` (counted in ``groups_stale_dropped``) or ``tis``: kept and importance-corrected
    against the engine's logprobs (needs ``trainer.loss.tis_cap``; counted in
    ``groups_stale_corrected``)."""


class AdvantageConfig(StrictModel):
    """Group-relative advantage estimation and dynamic sampling."""

    type: Literal["grpo", "rloo"] = "grpo"
    """Estimator: grpo (group mean baseline) or rloo (leave-one-out baseline)."""
    scale_by_std: bool = True
    """Divide by the group's reward std (GRPO); false gives Dr. GRPO's unscaled advantages."""
    drop_zero_variance: bool = True
    """Drop groups whose rewards are all equal (no signal) before the forward pass."""
    refill_rounds: int = Field(0, ge=0, le=16)
    """Dynamic sampling (DAPO): when dropped groups (zero variance, reward errors, stale)
    leave fewer than ``prompts_per_step`` groups that teach, draw that many new prompts and
    generate again, up to this many extra rounds per step (counted in ``refill_rounds`` and
    ``refill_prompts``). 0: train on what is left."""


class DPOConfig(StrictModel):
    """Online DPO from verifiable rewards (``algorithm = "dpo"``): how a step's groups become
    preference pairs (orchestrator/pairs.py). The loss itself is ``trainer.loss``
    (``type = "dpo"``: variant, beta)."""

    mode: Literal["online", "offline"] = "online"
    """``online``: every step, each group's best completion against its worst.
    ``offline``: the pairs are read from the run's datasets instead of generated: every row
    needs text columns ``chosen`` and ``rejected`` (or ``fields`` naming them) besides its
    prompt; the engines only serve the evaluations."""
    margin: float = Field(0.0, ge=0.0)
    """A group makes a pair only when its best and worst scores differ by more than this."""


class CheckpointConfig(StrictModel):
    """When the run saves itself (atomically: write, then rename) for ``--resume``."""

    every_steps: int = Field(50, ge=0)
    """Save every this many steps (0: never in between); the last step is always saved, and
    on request: SIGUSR1 to the driver, or a file named ``CHECKPOINT`` in the run directory
    (the SLURM launcher uses both)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""


class ClusterConfig(StrictModel):
    """Where the run's components live."""

    mode: Literal["ray", "local"] = "ray"
    """ray: engines, trainer ranks and env pool hosts are Ray actors placed by node role (a
    private local cluster unless ``address`` is set). local: the same loop in one process,
    no Ray (one trainer rank, one engine, one pool per env)."""
    address: str | None = None
    """Join this running Ray cluster (``host:port``; the SLURM launcher's) instead of
    starting a local one."""
    token_path: Path | None = None
    """Ray auth token file of the cluster at ``address``."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs Ray schedules with on the local cluster; None = 4 x the machine's cores
    (engines, trainer ranks and env workers share the real cores; most wait on each other)."""
    allow_network: bool = False
    """Start the local cluster even with network interfaces present (Ray binds the routable
    address; token auth stays on). Off: only inside a loopback-only network namespace."""


class EnvApiConfig(StrictModel):
    """The env registration API, served by the run's driver on the head node."""

    enabled: bool = False
    """Serve it for the run's life: envs registered with a ``mixture`` join the prompt mixture
    at the next step, deleted ones drain (orchestrator/live.py). Bearer token in
    ``<state_dir>/api-token``."""
    host: str = "127.0.0.1"
    """Bind address; the default keeps it on the head's loopback (reach it with ``ssh -L``)."""
    port: int = Field(8710, ge=1, le=65535)
    """TCP port."""
    state_dir: Path | None = None
    """Registry, token and inline envs; None = ``<output_dir>/env-api``."""
    workers: int = Field(2, ge=1, le=256)
    """Worker processes per pool of an env that joins (capped by its ``concurrency``)."""
    replicas: int = Field(1, ge=1)
    """Pool actors per env that joins, on the trainer nodes."""
    store: Path | None = None
    """Env store venv-isolated envs that register are built into (on the head node); None =
    the store of the run's own venv envs (their ``isolation.store``, else
    ``$CARAVELA_ENV_STORE`` or ``~/.cache/caravela/envs``)."""
    wheelhouse: Path | None = None
    """Wheel directory they are built from, offline with no package index (the head node
    has no internet); None = the wheelhouse of the run's own venv envs, if one has one."""
    offline: bool = False
    """Build them without network access even with no wheelhouse (uv cache only); also on
    when a wheelhouse is used or the run's own venv envs are offline. An env that cannot be
    built offline ends ``failed`` with the reason (API, run log, ``live_envs_failed``)."""


class EvalSet(StrictModel):
    """One held-out set (``[[eval.sets]]``), scored by one env of the run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Its key in metrics (``eval/<name>/pass1``), eval.json and report.png."""
    file: Path
    """JSONL in the datasets' default columns (``id``, ``prompt``, the env's fields)."""
    env: str
    """The env that scores it: one of the run's ``[[envs]]``. A row naming another env
    (an ``env`` column) is an error."""
    n: int | None = Field(None, ge=1)
    """Prompts evaluated (the first N rows; None: ``eval.num_prompts``)."""
    k: int | None = Field(None, ge=1)
    """Samples per prompt for pass@1 and pass@k (None: ``eval.k``)."""
    greedy: bool = True
    """Also decode each prompt greedily (greedy accuracy)."""


class EvalConfig(StrictModel):
    """Held-out evaluation on the engines, scored by the env pools: at the start, every
    ``every_steps`` steps and at the end.

    The sets are ``[[eval.sets]]``; without any, one set named ``heldout`` from ``heldout``
    (its rows' ``env`` column, else ``env``, names the env that scores it)."""

    sets: list[EvalSet] = Field(default_factory=list)
    """Held-out sets, each scored by its own env; the first is the run's headline
    (``before``/``after`` in eval.json, the progress line)."""
    heldout: Path = paths.TINY_HELDOUT
    """Held-out JSONL of the single set used when ``sets`` is empty (never sampled for
    training)."""
    env: str | None = None
    """Env of ``heldout`` when its rows have no ``env`` column."""
    num_prompts: int = Field(200, ge=1)
    """Prompts per set (the first N rows), unless the set says ``n``."""
    k: int = Field(8, ge=1)
    """Samples per prompt for pass@1 (sampled) and pass@k, unless the set says ``k``."""
    every_steps: int = Field(50, ge=0)
    """Evaluate every N steps too (0: only at the start and the end)."""

    @model_validator(mode="after")
    def _one_way(self) -> EvalConfig:
        if self.sets and ({"heldout", "env"} & self.model_fields_set):
            raise ValueError(
                "eval.heldout / eval.env describe the single set used without [[eval.sets]]; "
                "with [[eval.sets]] give each set's file and env there instead"
            )
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.sets names must be unique, got {names}")
        return self

    def resolved(self) -> list[EvalSet]:
        """The sets with ``n`` and ``k`` filled in. The single ``heldout`` set's env is
        ``env`` or, when unset, "" (its rows' ``env`` column says: ``orchestrator.evaluate``)."""
        sets = self.sets or [EvalSet(name="heldout", file=self.heldout, env=self.env or "")]
        return [
            s.model_copy(update={"n": s.n or self.num_prompts, "k": s.k or self.k}) for s in sets
        ]


class RunConfig(StrictModel):
    """Everything ``caravela run`` needs."""

    model: Path = paths.TINY_MODEL
    """HF-format model directory (config, safetensors, tokenizer); never a hub id."""
    output_dir: Path = Path("runs/default")
    """Run directory: resolved config, metrics, checkpoints."""
    steps: int = Field(200, ge=0)
    """Optimizer steps."""
    seed: int = 0
    """Seed for prompt sampling and generation."""
    datasets: list[DatasetSpec] = Field(
        default_factory=lambda: [DatasetSpec(path=paths.TINY_TRAIN, env="arith")], min_length=1
    )
    """Prompt sources, each tagged with the env that scores it."""
    prepared_dir: Path | None = None
    """Pre-tokenized datasets written by ``caravela data prepare`` (used when they match the
    dataset and tokenizer, else prompts are tokenized on the fly); None =
    ``$CARAVELA_DATA_STORE``, else ``<output_dir>/prepared``."""
    envs: list[EnvSpec] = Field(
        default_factory=lambda: [
            EnvSpec(name="arith", path=paths.ARITH_ENV, isolation=VenvIsolation())
        ],
        min_length=1,
    )
    """Reward environments."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Sampling of completions."""
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    """Prompt format: plain text or the tokenizer's chat template, and a system prompt."""
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    """Advantage estimation."""
    algorithm: Literal["grpo", "dpo", "ppo"] = "grpo"
    """``grpo``: the GRPO family (group-relative advantages, ``trainer.loss.type`` grpo,
    dr_grpo, dapo or gspo). ``dpo``: online DPO, each group's best against its worst
    completion (``dpo``), with ``trainer.loss.type = "dpo"``. ``ppo``: PPO with a critic on
    each completion's score, with ``trainer.loss.type = "ppo"``. The loss type defaults to
    the algorithm's."""
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """Pairs for ``algorithm = "dpo"``."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Optimiser, loss and batching."""
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    """Generation backend."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Ray cluster: local (embedded default) or joined; or no Ray at all."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints and ``--resume``."""
    env_api: EnvApiConfig = Field(default_factory=EnvApiConfig)
    """Live env registration during the run."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Experiment trackers (TensorBoard, W&B, MLflow)."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    """Job layout for ``caravela slurm render|submit``."""
    resume: bool = False
    """Continue from the run directory's latest checkpoint (``caravela run --resume``).
    Without it a run refuses a directory holding a previous run, unless ``caravela run
    --overwrite`` (a flag, never a config value) deletes that run first."""

    @model_validator(mode="before")
    @classmethod
    def _dpo_loss_by_default(cls, data: Any) -> Any:
        # ``--set algorithm=dpo`` alone means the DPO loss with its defaults (ppo: PPO's)
        algorithm = data.get("algorithm") if isinstance(data, dict) else None
        if algorithm not in ("dpo", "ppo"):
            return data
        trainer = data.get("trainer", {})
        if isinstance(trainer, dict) and "type" not in trainer.get("loss", {}):
            loss = {"type": algorithm, **trainer.get("loss", {})}
            return {**data, "trainer": {**trainer, "loss": loss}}
        return data

    @model_validator(mode="after")
    def _algorithm_has_its_loss(self) -> RunConfig:
        loss = self.trainer.loss.type
        for own in ("dpo", "ppo"):
            if (self.algorithm == own) != (loss == own):
                raise ValueError(
                    f"algorithm = {self.algorithm!r} with trainer.loss.type = {loss!r}: the "
                    f"{own.upper()} loss trains on what algorithm = {own!r} hands the "
                    f"trainer, and only on that; set both to {own!r}, or neither"
                )
        return self

    @model_validator(mode="after")
    def _stale_tis_needs_cap(self) -> RunConfig:
        if self.rollout.stale == "tis" and self.trainer.loss.tis_cap is None:
            raise ValueError(
                "rollout.stale = 'tis' corrects stale samples with truncated importance "
                "sampling, which needs trainer.loss.tis_cap (e.g. 2.0); set it, or use "
                "rollout.stale = 'drop'"
            )
        return self

    @model_validator(mode="after")
    def _decay_after_warmup(self) -> RunConfig:
        t = self.trainer
        total = self.steps * t.updates_per_batch
        if t.lr_schedule != "constant" and 0 < total <= t.warmup_steps:
            raise ValueError(
                f"trainer.lr_schedule = {t.lr_schedule!r} decays after the warm-up, but "
                f"trainer.warmup_steps = {t.warmup_steps} covers the whole run ({self.steps} "
                f"steps x {t.updates_per_batch} updates = {total} optimizer steps); lower "
                "warmup_steps or use trainer.lr_schedule = 'constant'"
            )
        return self

    @model_validator(mode="after")
    def _tis_needs_the_whole_distribution(self) -> RunConfig:
        if self.trainer.loss.tis_cap is not None and self.rollout.top_p < 1.0:
            raise ValueError(
                f"trainer.loss.tis_cap weighs trainer against engine logprobs, but with "
                f"rollout.top_p = {self.rollout.top_p} the engines report those of the "
                "truncated distribution, which the trainer does not compute: set "
                "rollout.top_p = 1.0, or unset trainer.loss.tis_cap"
            )
        return self

    @model_validator(mode="after")
    def _local_is_one_process(self) -> RunConfig:
        if self.cluster.mode != "local":
            return self
        needs_ray = [
            f"trainer.ranks_per_node = {self.trainer.ranks_per_node}"
            if self.trainer.ranks_per_node > 1
            else "",
            f"inference.backend.engines_per_node = {self.inference.backend.engines_per_node}"
            if self.inference.backend.engines_per_node > 1
            else "",
            *(
                f"envs[{i}].replicas = {e.replicas}"
                for i, e in enumerate(self.envs)
                if e.replicas > 1
            ),
            f"cluster.address = {self.cluster.address!r}" if self.cluster.address else "",
        ]
        if any(needs_ray):
            raise ValueError(
                "cluster.mode = 'local' runs one trainer rank, one engine and one pool per env "
                f"in this process, so {', '.join(x for x in needs_ray if x)} needs "
                "cluster.mode = 'ray' (or set those back to 1 / unset)"
            )
        return self

    @model_validator(mode="after")
    def _datasets_have_envs(self) -> RunConfig:
        names = [e.name for e in self.envs]
        if len(set(names)) != len(names):
            raise ValueError(f"env names must be unique, got {names}")
        for d in self.datasets:
            if d.env not in names:
                raise ValueError(
                    f"dataset {d.path} names env {d.env!r}, which is not in envs {names}; "
                    "add an [[envs]] entry or fix the dataset's env"
                )
        for s in self.eval.resolved():
            if s.env and s.env not in names:
                what = f"eval.sets {s.name!r}" if self.eval.sets else "eval.env"
                raise ValueError(
                    f"{what} is scored by env {s.env!r}, which is not in envs {names}; "
                    "declare [[eval.sets]] for this run's envs (file, env) or add the env"
                )
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], value); the value is read as TOML, else as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.lr=1e-5")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def _resolve_paths(data: Any, base: Path) -> Any:
    """Make relative ``path``-like entries relative to the config file's directory."""
    if isinstance(data, dict):
        return {
            k: (
                str((base / v).resolve())
                if k in ("path", "model", "heldout", "output_dir", "prepared_dir")
                and isinstance(v, str)
                and not Path(v).is_absolute()
                else _resolve_paths(v, base)
            )
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_resolve_paths(v, base) for v in data]
    return data


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the (sub)model a validation error points into, for suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not hasattr(current, "model_fields"):
            continue
        field = current.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        current = next((a for a in (ann, *args) if hasattr(a, "model_fields")), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_errors(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p in _TAGS)]
        where = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(loc[:-1]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            msg = f"unknown key; {hint}"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    lines.append("Fix it in the config file or with --set KEY=VALUE.")
    return "\n".join(lines)


_TAGS = {
    "grpo",
    "dr_grpo",
    "dapo",
    "gspo",
    "dpo",
    "ppo",
    "auto",
    "transformers",
    "vllm",
    "process",
    "venv",
    "docker",
    "apptainer",
}


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load ``path`` (TOML) or the embedded default, apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
            # .json: a resolved config a run wrote (runs/<name>/config.json, the SLURM launcher)
            data = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML/JSON: {e}") from e
        data = _resolve_paths(data, Path(path).resolve().parent)
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, RunConfig)) from None
