"""The only place that reads Slurm's and the launchers' environment variables."""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def is_rank_zero() -> bool:
    return rank() == 0


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def slurm_restart_count() -> int:
    """How often Slurm requeued this job; > 0 means: resume, never start over."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
