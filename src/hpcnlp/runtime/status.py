"""How a job ended, said three ways that agree: its exit code, `<dir>/status.json`, and the outcome
line rank 0 leaves for slurm/launch.sh (whose exit code sacct shows, whatever torchrun did).

Exit codes (the batch script's too):
  0   finished
  1   failed (a crash: the log says why)
  2   refused: the config or its data is wrong; nothing ran, nothing was written
  3   rejected: validate's gate said no; the bundle went to rejected_dir
  4   stalled: a rank made no training step for step_timeout_minutes
  75  checkpointed for requeue (preemption); the batch script requeues unless max_requeues is reached
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hpcnlp.runtime import env, rundir
from hpcnlp.runtime.io import atomic_write_json

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_REJECTED, EXIT_STALLED, EXIT_REQUEUE = 0, 1, 2, 3, 4, 75
STATES = {
    EXIT_OK: "finished",
    EXIT_FAILED: "failed",
    EXIT_CONFIG: "failed",
    EXIT_REJECTED: "rejected",
    EXIT_STALLED: "failed",
    EXIT_REQUEUE: "preempted",
}


def update(path: Path | None, create: bool = False, **fields) -> None:
    """Merge `fields` into status.json (rank 0 only); keeps the list of Slurm job ids that worked on it.
    Written only where the job (or, with `create`, submit) made the dir: a refused job writes nothing."""
    if path is None or env.rank() != 0 or not (create or path.parent.is_dir()):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    jobs = current.get("slurm_job_ids", [])
    if env.slurm_job_id() and env.slurm_job_id() not in jobs:
        jobs = [*jobs, env.slurm_job_id()]
    atomic_write_json(
        path,
        {
            **current,
            **fields,
            "slurm_job_ids": jobs,
            "restarts": env.slurm_restart_count(),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def update_outside(path: Path | None, wait: float = 0.0, **fields) -> bool:
    """update() from outside the job (submit's "queued", cancel's "cancelled"), under the run dir's lock: never
    beside a job writing its own. Waits up to `wait` seconds for a running job to let go (cancel: the job that
    scancel ends writes its last state, then this one comes last). False, nothing written, while a job holds it."""
    if path is None:
        return False
    out = path.parent
    # No lock file: no training job ever claimed the dir (export and validate take none), none holds it.
    if rundir.holds(out) or not rundir.lock_path(out).exists():
        update(path, create=True, **fields)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            rundir.acquire(out)
            break
        except rundir.OutputDirRefused:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
    try:
        update(path, create=True, **fields)
    finally:
        rundir.release(out)
    return True


def link_log(log: str | None, where: Path) -> None:
    """The job's Slurm log, linked beside its status.json (rank 0, where the job made the dir): the run's
    files and its log in one place. A name already there that is not our link is left alone."""
    if not log or env.rank() != 0 or not where.is_dir() or not Path(log).is_file():
        return
    link = where / Path(log).name
    if link.exists() and not link.is_symlink():
        return
    tmp = where / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(Path(log).absolute(), tmp)
    os.replace(tmp, link)
    rundir.record_files(where, link.name)  # the run's own: overwrite may move it aside with the run


def _write_first(path: str, line: str) -> bool:
    """Create `path` holding `line` unless a line is there already (the first rank to say wins)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(line)
    return True


def record_outcome(code: int, requeue: bool, message: str) -> None:
    """The line slurm/launch.sh reads after the step: `<code> <requeue|stop> <message>`. A line already
    there (a rank that stalled: `stalled`) is kept; launch.sh removes the file before each step."""
    path = env.hpcnlp_setting("OUTCOME_FILE")
    if path and env.rank() == 0:
        _write_first(path, f"{code} {'requeue' if requeue else 'stop'} {' '.join(message.split())}\n")


def process_exit(code: int) -> int:
    """Under slurm/launch.sh the outcome line carries a requeue, so the processes end 0 and torchrun
    prints no failure banner for a checkpoint; run by hand, 75 is the exit code itself."""
    return EXIT_OK if code == EXIT_REQUEUE and env.hpcnlp_setting("OUTCOME_FILE") else code


def stalled(message: str, status_file: Path | None = None) -> None:
    """Fail the whole job now: any rank may call this (rank 0 may be the stalled one). The first rank
    to say it is kept: a stopped rank woken by the teardown would otherwise overwrite the diagnosis.
    status.json says it too when this process holds the run's lock (rank 0)."""
    if status_file is not None and rundir.holds(status_file.parent):
        update(status_file, state="failed", reason=f"stalled: {message}")
    path = env.hpcnlp_setting("OUTCOME_FILE")
    if path:
        _write_first(path, f"{EXIT_STALLED} stop {' '.join(message.split())}\n")
    os._exit(EXIT_STALLED)
