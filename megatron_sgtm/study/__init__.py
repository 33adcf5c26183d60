"""Sweeps of SGTM and baselines: specs, executors (local, parallel, SLURM), analysis, plots."""
