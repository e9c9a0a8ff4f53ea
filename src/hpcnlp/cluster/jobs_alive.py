"""What Slurm says of the jobs a run recorded (status.json: queued_job_id, slurm_job_ids; a sweep's
manifest: its array job): for `hpcnlp status` (state, stale runs), `cancel`, and the guard that
refuses a second submission of a run that is still queued or running."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from hpcnlp.config import Problem

# squeue's states of a job that is not over (a requeued job goes back to PENDING)
ALIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
}
FINAL = {"finished", "failed", "rejected", "cancelled"}  # status.json states of a run that is over


class SqueueFailed(Exception):
    """squeue could not say (no squeue here, it failed or timed out): the job may be alive."""


def squeue_states(job_id: str) -> list[str]:
    """States squeue lists for a job (an array: one per task still known); [] when it no longer knows
    the job (a real squeue says 'Invalid job id' for a purged one). SqueueFailed when it cannot say."""
    if not shutil.which("squeue"):
        raise SqueueFailed("no squeue on PATH")
    try:
        res = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SqueueFailed(str(e)) from None
    if res.returncode != 0:
        if "invalid job id" in res.stderr.lower():
            return []
        raise SqueueFailed(
            (res.stderr or res.stdout).strip().splitlines()[-1]
            if (res.stderr or res.stdout).strip()
            else f"exit {res.returncode}"
        )
    return res.stdout.split()


def slurm_state(job_id: str | None) -> str | None:
    """The job's state as Slurm knows it: squeue (pending, running, recently ended), else sacct; ''
    when Slurm has forgotten the job; None when there is no Slurm to ask here (or it did not answer)."""
    if not job_id or not shutil.which("squeue"):
        return None
    answered = False
    for cmd in (
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
    ):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()[0]
        answered = answered or res.returncode == 0 or "invalid job id" in res.stderr.lower()
    return "" if answered else None


def read_status(path: Path | None) -> dict:
    try:
        st = json.loads(path.read_text()) if path else {}
        return st if isinstance(st, dict) else {}
    except (OSError, ValueError):
        return {}


def current_job(st: dict) -> str | None:
    """The job id working on the run now: the one submitted last, unless a later one already ran."""
    ran = st.get("slurm_job_ids") or []
    queued = st.get("queued_job_id")
    return queued if queued and queued not in ran else (ran[-1] if ran else queued)


def recorded_jobs(st: dict) -> list[str]:
    """Every job id a status.json names, newest first."""
    ids = [st.get("queued_job_id"), *reversed(st.get("slurm_job_ids") or [])]
    return [str(i) for i in dict.fromkeys(ids) if i]


def live_jobs(job_ids: list[str]) -> tuple[list[tuple[str, str]], str | None]:
    """([(job id, state)] of those squeue still lists as not over, why squeue could not say or None)."""
    alive, failed = [], None
    for job in job_ids:
        try:
            states = [s for s in squeue_states(job) if s in ALIVE]
        except SqueueFailed as e:
            failed = str(e)
            continue
        if states:
            alive.append((job, states[0]))
    return alive, failed


def busy_problems(what: str, job_ids: list[str], key: str = "submit") -> list[Problem]:
    """A problem when one of `job_ids` (the jobs of `what`: a run, a chain, a sweep) is still queued or
    running, or squeue cannot say (then it may be): a second submission would race it on the same files."""
    if not job_ids:
        return []
    alive, failed = live_jobs(job_ids)
    if alive:
        jobs = ", ".join(f"{j} ({s})" for j, s in alive)
        return [
            Problem(
                key=key,
                message=f"{what} already has job {jobs} queued or running",
                fix=f"wait for it, cancel it (hpcnlp cancel / scancel {alive[0][0]}), or pass --force",
            )
        ]
    if failed:
        return [
            Problem(
                key=key,
                message=f"squeue could not say whether job {', '.join(job_ids)} of {what} is still "
                f"queued or running ({failed}): it may be",
                fix="try again when squeue answers, or pass --force if you know it has ended",
            )
        ]
    return []


def run_busy(what: str, status_path: Path | None) -> list[Problem]:
    """busy_problems for a run whose status.json says it is not over (queued, running, preempted)."""
    st = read_status(status_path)
    if not st or st.get("state") in FINAL:
        return []
    return busy_problems(what, recorded_jobs(st))
