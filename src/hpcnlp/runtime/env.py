"""The only place that reads Slurm's and the launchers' environment variables."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from hpcnlp.runtime import gres


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def slurm_restart_count() -> int:
    """How often Slurm requeued this job; > 0 means: resume, never start over."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


# --- Slurm job facts for the multi-node launcher (runtime/launch.py) --------------------------
def slurm_node_id() -> int:
    """This node's index in the allocation (0 on the batch host); expanded on each node."""
    return int(os.environ.get("SLURM_NODEID", "0"))


def slurm_nodelist() -> str | None:
    return os.environ.get("SLURM_JOB_NODELIST")


def slurm_num_nodes() -> int:
    return int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))


def slurm_gpus_on_node() -> int:
    """GPUs Slurm gave this node, whichever way the job asked (hpcnlp.runtime.gres: the same reader the
    dry run uses on the sbatch options)."""
    return gres.from_environment(dict(os.environ))


def slurm_gpus_per_node_request() -> str | None:
    """The job's --gpus-per-node as given (`4`, `a100:4`), when it used that form."""
    return os.environ.get("SLURM_GPUS_PER_NODE") or None


def slurm_cpus_per_task() -> int | None:
    """CPUs of each task of the allocation: SLURM_CPUS_PER_TASK, else (no --cpus-per-task) all the CPUs
    Slurm gave this node (SLURM_CPUS_ON_NODE) for the one task per node; None outside an allocation.
    Since Slurm 22.05 srun does not inherit it: the launcher passes it to the step explicitly."""
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = (os.environ.get(name) or "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def in_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def slurm_submit_dir() -> str:
    return os.environ.get("SLURM_SUBMIT_DIR", os.getcwd())


def slurm_array_task_id() -> int | None:
    value = os.environ.get("SLURM_ARRAY_TASK_ID")
    return int(value) if value not in (None, "") else None


def hpcnlp_setting(name: str, default: str | None = None) -> str | None:
    """`HPCNLP_<NAME>` (launcher, image, container, ...): how users steer slurm/launch.sh."""
    value = os.environ.get(f"HPCNLP_{name}")
    return value if value not in (None, "") else default


def code_version() -> str:
    """The code this process runs: $HPCNLP_GIT_COMMIT (the container image sets it at build), else the git
    HEAD of the package's own source checkout ("-dirty" with changes to its tracked src/ files), else the
    package's version. Submit records it; a job refuses to start from another (hpcnlp.jobs.check_config)."""
    return hpcnlp_setting("GIT_COMMIT") or _checkout_commit() or _package_version()


@functools.cache  # a subprocess or two; the checkout does not change under a running job's feet
def _checkout_commit() -> str | None:
    repo = Path(__file__).resolve().parents[3]  # <checkout>/src/hpcnlp/runtime/env.py

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo:  # an installed package inside another repo
            return None
        # Dirty: tracked files of the code changed (src/); an edited job YAML is a config, not code.
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src")
        return git("rev-parse", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("hpcnlp")
    except metadata.PackageNotFoundError:
        return "unknown"
