"""The rule that protects a run directory: a run starts only where no previous run left its
results, unless told to continue that run (``--resume``) or to delete it (``--overwrite``).

``--overwrite`` is the only thing that deletes or truncates a previous run's files. A
resumed run keeps everything: checkpoint rotation (``checkpoint.keep``) deletes only the
older checkpoints of the run it continues, and the lines of the steps it redoes move to
``*.superseded.jsonl`` (``orchestrator.record``).

What a run writes, which marks a previous run and which ``--overwrite`` deletes, is
``RESULTS`` (and ``envs/``, the env workers' logs). Not a previous run, and kept by
``--overwrite``: ``config.json`` and ``job.sbatch`` (``caravela slurm render`` writes them
before the job's run starts; the run rewrites ``config.json``), ``prepared/`` (``caravela
data prepare``), ``env-api/`` (registered envs and the API token), Ray's directories and
token, and a ``CHECKPOINT`` request.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from orchestrator import checkpoint

RESULTS = (
    "metrics.jsonl",
    "prompts.jsonl",
    "metrics.superseded.jsonl",
    "prompts.superseded.jsonl",
    "samples",  # the samples log (orchestrator.samples), its segments and superseded file
    "checkpoints",
    "final",
    "eval.json",
    "report.png",
    "tensorboard",
    "wandb",  # logging.trackers (orchestrator.trackers): offline W&B runs,
    "mlruns",  # the MLflow file store,
    "trackers.json",  # and the ids a resumed run continues
)
"""A previous run's results, in its run directory."""
LOGS = ("envs",)
"""Also the previous run's (``caravela eval`` writes there too), deleted with it."""


class RunDirError(ValueError):
    """The run directory holds a previous run and neither ``--resume`` nor ``--overwrite``."""


def previous_run(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that a previous run left (``RESULTS``)."""
    return [name for name in RESULTS if (Path(run_dir) / name).exists()]


def claim(
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    reads: Iterable[Path] = (),
    log: Callable[[str], Any] = print,
) -> None:
    """Make ``run_dir`` ready for a run: a fresh start refuses a directory with a previous
    run in it unless ``overwrite``, which deletes that run (``RESULTS`` and ``LOGS``), never
    what the new run ``reads`` (its model, datasets); a resumed run continues what is
    there: from its latest checkpoint, or from step 0 while it has none (a job stopped
    before its first checkpoint), the earlier lines kept aside."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume continues the previous run, --overwrite deletes it: pick one")
    found = previous_run(run_dir)
    if resume and checkpoint.latest(run_dir) is None:
        # stopped before its first checkpoint (a preempted or requeued job), or never run:
        # the run starts at step 0; the lines an earlier try wrote move aside (``record``)
        log(
            f"--resume: no checkpoint in {run_dir / 'checkpoints'} yet: the run starts at step 0"
            + (f"; what an earlier try left ({', '.join(found)}) stays" if found else "")
        )
    if resume or not found:
        return
    if not overwrite:
        raise RunDirError(
            f"{run_dir} holds a previous run ({', '.join(found)}): pass --resume to continue "
            "it from its latest checkpoint, or --overwrite to delete it and start afresh "
            "(or set another output_dir)"
        )
    doomed = [run_dir / name for name in (*found, *LOGS)]
    for path in map(Path, reads):
        hit = next((d for d in doomed if path.resolve().is_relative_to(d.resolve())), None)
        if hit is not None:
            raise RunDirError(
                f"--overwrite would delete {hit}, and this run reads {path} from it: copy it "
                "out of the run directory first"
            )
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    log(f"--overwrite: deleted the previous run in {run_dir} ({', '.join(found)})")
