"""SLURM launcher: renders the sbatch script (``caravela.sbatch``) from a run config and a
site profile (``profiles/*.toml``), and submits it."""
