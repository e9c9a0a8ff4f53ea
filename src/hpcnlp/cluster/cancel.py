"""`hpcnlp cancel`: scancel the jobs a run, a job config's run, a pipeline's stages or a sweep have
queued or running (from their status.json and the sweep's manifest), and mark those runs cancelled."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hpcnlp.cluster.jobs_alive import FINAL, current_job, read_status
from hpcnlp.cluster.plan import refused
from hpcnlp.cluster.status import resolve_runs
from hpcnlp.config import ConfigError
from hpcnlp.runtime import status

# How long cancel waits for a cancelled job to let go of its run dir before marking it: Slurm's default
# KillWait (30 s, SIGTERM to SIGKILL) and some slack.
CANCEL_WAIT_S = 60.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cancel", help="scancel the queued or running jobs of a run, config, pipeline or sweep")
    p.add_argument("target", help="a run's output_dir, a job config, a pipeline YAML or a sweep's output_dir")


def main(args: argparse.Namespace) -> int:
    try:
        return cancel(args.target)
    except ConfigError as e:
        return refused(e, queueing=False)


def cancel(target: str) -> int:
    runs = resolve_runs(target)
    jobs: dict[str, list[str]] = {}  # job id -> names of the runs it works on
    sweep = Path(target) / "sweep.json"
    if Path(target).is_dir() and sweep.is_file():  # the array job as a whole: its pending tasks too
        array = json.loads(sweep.read_text()).get("job_id")
        if array:
            jobs.setdefault(str(array), []).append(f"sweep {target}")
    marked = []
    for run in runs:
        st = read_status(run.status)
        if not st or st.get("state") in FINAL:
            continue
        job = current_job(st)
        if job and not any(job.startswith(f"{a}_") for a in jobs):  # a task of the array cancelled above
            jobs.setdefault(str(job), []).append(run.name)
        marked.append(run)
    if not jobs and not marked:
        print(f"cancel: nothing queued or running in {target}")
        return 0
    rc = 0
    if jobs:
        res = subprocess.run(["scancel", *jobs], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"error: scancel {' '.join(jobs)} failed: {(res.stderr or res.stdout).strip()}", file=sys.stderr)
            return 1
        for job, names in jobs.items():
            print(f"cancelled job {job} ({', '.join(names)})")
    for run in marked:  # after the job scancel ended has written its own last state (it holds the lock till then)
        if not status.update_outside(
            run.status, wait=CANCEL_WAIT_S, state="cancelled", reason="cancelled with hpcnlp cancel"
        ):
            print(f"cancel: {run.name}: its job still holds {run.status.parent} after {CANCEL_WAIT_S:g} s; not marked")
    return rc
