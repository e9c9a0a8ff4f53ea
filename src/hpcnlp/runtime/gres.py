"""GPUs per node, from any of the ways Slurm lets a job ask for them: the one reader that the dry run
(sbatch options, hpcnlp.cluster.options) and the launcher inside the job (SLURM_* variables, through
hpcnlp.runtime.env) share, so both plan the same number of processes per node.

    --gpus-per-node=4 | --gpus-per-node=a100:4          SLURM_GPUS_PER_NODE
    --gres=gpu:4 | --gres=gpu:a100:4 | --gres=gpu:a100:4,nvme:1
    --gpus=8 (with --nodes=2: 4 per node) | --gpus=a100:8  SLURM_GPUS
    --gpus-per-task=2 (x tasks per node; hpcnlp's templates run one task per node)  SLURM_GPUS_PER_TASK
Standard library only (slurm/launch.sh's planner may run under a bare python3).
"""

from __future__ import annotations

import re
import shutil
import subprocess


def count(value: str | None) -> int | None:
    """GPUs in one `[type:]N` value (`4`, `a100:4`, `gpu:a100:4`, `gpu:4(S:0-1)`); `gpu` alone is 1.
    None: no value."""
    if value in (None, ""):
        return None
    value = re.sub(r"\(.*?\)", "", str(value).strip())  # socket bindings: gpu:4(S:0-1)
    last = value.split(":")[-1]
    if last.isdigit():
        return int(last)
    return 1 if value else None  # a bare type (`gpu`, `a100`) asks for one


def gres_gpus(gres: str | None) -> int | None:
    """GPUs of a --gres list (`gpu:a100:4,nvme:1`: 4); None: no GPU in it (or no --gres)."""
    if not gres:
        return None
    found = [
        count(item) for item in re.split(r",(?![^(]*\))", gres) if item.strip().split(":")[0].split("/")[0] == "gpu"
    ]
    return sum(n or 0 for n in found) if found else None


def is_gpu_option(option: str) -> bool:
    """An sbatch option that asks for GPUs (a --gres list asks only when it names gpu)."""
    name, _, value = option.partition("=")
    if name in ("--gpus", "-G", "--gpus-per-node", "--gpus-per-task", "--gpus-per-socket"):
        return True
    return name == "--gres" and gres_gpus(value) is not None


def per_node(
    *,
    gpus_per_node: str | None = None,
    gres: str | None = None,
    gpus: str | None = None,
    gpus_per_task: str | None = None,
    nodes: int = 1,
    tasks_per_node: int = 1,
) -> int | None:
    """GPUs each node gets from these requests (most specific first); None: none of them is given."""
    for value in (count(gpus_per_node), gres_gpus(gres)):
        if value is not None:
            return value
    if count(gpus_per_task) is not None:
        return count(gpus_per_task) * max(tasks_per_node, 1)
    if count(gpus) is not None:
        return max(count(gpus) // max(nodes, 1), 1 if count(gpus) else 0)
    return None


def from_environment(environ: dict) -> int:
    """GPUs of this node inside an allocation: SLURM_GPUS_ON_NODE (what the node was given), else the
    request forms Slurm exports (SLURM_GPUS_PER_NODE, SLURM_GPUS, SLURM_GPUS_PER_TASK), else the ids in
    SLURM_JOB_GPUS; 0 when none says anything. `environ`: the variables (hpcnlp.runtime.env reads them)."""
    on_node = environ.get("SLURM_GPUS_ON_NODE")
    if on_node not in (None, "") and on_node.isdigit():
        return int(on_node)
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or "1"
    tasks = (environ.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0]
    found = per_node(
        gpus_per_node=environ.get("SLURM_GPUS_PER_NODE"),
        gpus=environ.get("SLURM_GPUS"),
        gpus_per_task=environ.get("SLURM_GPUS_PER_TASK"),
        nodes=int(nodes) if nodes.isdigit() else 1,
        tasks_per_node=int(tasks) if tasks.isdigit() else 1,
    )
    if found is not None:
        return found
    ids = environ.get("SLURM_JOB_GPUS") or environ.get("SLURM_STEP_GPUS") or ""
    return len([i for i in ids.split(",") if i.strip()])


def step_option(gpus: int, gpus_per_node: str | None = None, gres: str | None = None) -> str | None:
    """How the srun step asks for the allocation's GPUs, explicitly (so it never runs without them):
    the job's own --gpus-per-node or --gres form where it used one, else --gpus-per-node=<count>."""
    if not gpus:
        return None
    if gpus_per_node:
        return f"--gpus-per-node={gpus_per_node}"
    if gres and gres_gpus(gres):
        return f"--gres={gres}"
    return f"--gpus-per-node={gpus}"


def nvidia_smi() -> tuple[list[str] | None, str]:
    """The driver version of each GPU nvidia-smi lists, or None and why not (no nvidia-smi, or it failed)."""
    if not shutil.which("nvidia-smi"):
        return None, "no nvidia-smi"
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed ({e})"
    lines = res.stdout.split()
    if res.returncode == 0 and lines:
        return lines, ""
    return None, f"nvidia-smi failed ({(res.stderr or res.stdout).strip()[:120]})"
