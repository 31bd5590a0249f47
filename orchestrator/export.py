"""A run's model as an HF model directory: loaded (``load_policy``), exported, and the model
paths the CLI accepts.

``export_model`` writes one: ``config.json``, ``generation_config.json``, the weights as
safetensors and the tokenizer. Both exports use it: the run's own, into ``<run>/final/``
once its last step is checkpointed (``orchestrator.loop``), and ``caravela export RUN_DIR
[--step N] OUT_DIR``, which reads a checkpoint's weights (sharded, or the whole-state
``trainer.pt`` of earlier versions: ``trainer.checkpoint.weights``) into the run's base
model, in ``trainer.dtype`` like the run's own export.

``served_model`` is what ``caravela serve`` and ``caravela eval`` do with their model
argument: an HF model directory is used as it is; a run directory gives its ``final/``
(written when the run finished), else (a run still going, or stopped) its latest
checkpoint exported to a temporary directory; a checkpoint directory is exported to a
temporary directory. Anything else is an error that names the three.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import checkpoint

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

FINAL = "final"
"""The run's trained model, in the run directory (``model/`` before this version)."""
_EARLIER_FINAL = "model"


def export_model(model: Any, tok: Any, path: Path) -> None:
    """``model`` and ``tok`` as an HF model directory ``path`` (config, generation config,
    safetensors, tokenizer), written to ``<path>.tmp`` and renamed into place: a crash
    leaves the previous one whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of the HF model directory ``model_dir`` (what the driver needs of the
    model: it never loads the weights)."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(
            f"model dir {model_dir} has no config.json; point `model` at a "
            "HF-format directory (hub ids are not supported offline)"
        )
    return AutoTokenizer.from_pretrained(model_dir)


def load_policy(cfg: RunConfig) -> tuple[Any, Any]:
    """The model in ``cfg.model`` (an HF model directory) in ``trainer.dtype``, and its
    tokenizer: ``caravela eval``'s copy and an export's (a run's driver loads only the
    tokenizer: ``load_tokenizer``)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tok = load_tokenizer(cfg.model)  # refuses a directory without config.json
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise here
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.trainer.dtype))
    return model, tok


def is_model_dir(path: Path) -> bool:
    """An HF model directory: a config and weights."""
    path = Path(path)
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    return (path / "config.json").is_file() and bool(weights)


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / "driver.json").is_file() and (path.parent.name == "checkpoints")


def is_run_dir(path: Path) -> bool:
    """What a run writes as it goes (``orchestrator.rundir.RESULTS``, the first of them)."""
    path = Path(path)
    return any((path / name).exists() for name in ("checkpoints", FINAL, "metrics.jsonl"))


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of ``step`` in ``run_dir`` (None: its latest)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if step is None:
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint ({root}/LATEST)")
        return ckpt
    ckpt = root / f"step-{step:06d}"
    if not (ckpt / "driver.json").is_file():
        have = sorted(
            int(p.name.removeprefix("step-"))
            for p in root.glob("step-*")
            if not p.name.endswith(".tmp") and (p / "driver.json").is_file()
        )
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint of step {step}; it has steps {have or 'none'} "
            "(checkpoint.keep bounds how many are kept)"
        )
    return ckpt


def export_checkpoint(ckpt: Path, out: Path, log: Callable[[str], Any] = print) -> Path:
    """The weights of checkpoint ``ckpt`` (``<run>/checkpoints/step-N``) as an HF model
    directory ``out``: the base model the run started from (its ``config.json``'s
    ``model``: architecture, tokenizer, generation config) with the checkpoint's weights,
    in ``trainer.dtype``."""
    from orchestrator.config import RunConfig
    from trainer.checkpoint import weights

    ckpt = Path(ckpt)
    run_config = ckpt.parent.parent / "config.json"
    if not run_config.is_file():
        raise FileNotFoundError(f"{ckpt}: its run directory has no config.json ({run_config})")
    # only what the export needs: a run of an earlier version may have other fields
    written = json.loads(run_config.read_text())
    dtype = written.get("trainer", {}).get("dtype", "float32")
    cfg = RunConfig.model_validate({"model": written["model"], "trainer": {"dtype": dtype}})
    if not (Path(cfg.model) / "config.json").is_file():
        raise FileNotFoundError(
            f"the run's base model {cfg.model} ({run_config}: `model`) is not there; the export "
            "takes its architecture and tokenizer from it"
        )
    model, tok = load_policy(cfg)
    trained = weights(ckpt)
    try:
        model.load_state_dict(trained)
    except RuntimeError as e:  # names or shapes differ
        raise ValueError(f"{ckpt} does not hold weights of {cfg.model}: {e}") from None
    export_model(model, tok, out)
    log(f"exported {ckpt} to {out}")
    return Path(out)


def export_run(run_dir: Path, base: Path, trainer: Any, log: Callable[[str], Any] = print) -> Path:
    """The run's trained model into ``<run_dir>/final/`` from its latest checkpoint (the
    last step is always checkpointed); with no checkpoint (no step run) a copy of the base
    model ``base``. The export runs on a trainer node (``trainer``: the run's ``TrainerGroup``,
    in rank 0's process, or a fresh task if rank 0 died; ``LocalTrainerGroup``: this
    process), so the driver never loads the weights."""
    run_dir = Path(run_dir)
    out = run_dir / FINAL
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        tmp = out.with_name(f"{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log(f"no step was checkpointed: {out} is a copy of the base model {base}")
        return out
    trainer.on_trainer_node(export_checkpoint, ckpt, out, _quiet)
    log(f"exported {ckpt} to {out} (on a trainer node)")
    return out


def _quiet(_: str) -> None:
    """``export_checkpoint``'s log in the rank's process: ``export_run`` logs in the driver."""


@contextmanager
def served_model(path: Path, log: Callable[[str], Any] = print) -> Iterator[Path]:
    """The HF model directory ``path`` stands for (module docstring); a temporary export is
    removed on exit."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if is_model_dir(path):
        yield path
        return
    source = None
    if is_checkpoint(path):
        source = path
    elif is_run_dir(path):
        if is_model_dir(path / FINAL):
            log(f"{path}: its trained model {path / FINAL}")
            yield path / FINAL
            return
        if checkpoint.latest(path) is None:
            if is_model_dir(path / _EARLIER_FINAL):  # a run of an earlier version
                yield path / _EARLIER_FINAL
                return
            raise FileNotFoundError(
                f"{path} is a run directory with no {FINAL}/ model and no checkpoint yet"
            )
        source = find_checkpoint(path)
    if source is None:
        raise FileNotFoundError(
            f"{path} is not a model: give an HF model directory (config.json and weights), "
            f"a run directory (its {FINAL}/ or latest checkpoint is used) or a checkpoint "
            "(<run>/checkpoints/step-NNNNNN)"
        )
    with tempfile.TemporaryDirectory(prefix="caravela-export-") as tmp:
        log(f"{path}: exporting checkpoint {source} (removed on exit)")
        yield export_checkpoint(source, Path(tmp) / source.name, log)
