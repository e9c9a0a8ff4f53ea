"""`hpcnlp logs`: print the Slurm log a run's status.json records (a pipeline's or a sweep's: each
run's in turn); -f follows it, like tail -f, until the job has ended."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hpcnlp.cluster.jobs_alive import ALIVE, current_job, read_status, slurm_state
from hpcnlp.cluster.plan import refused
from hpcnlp.cluster.status import resolve_runs
from hpcnlp.config import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("logs", help="print (or follow, -f) the Slurm log of a run, config, pipeline or sweep")
    p.add_argument("target", help="a run's output_dir, a job config, a pipeline YAML or a sweep's output_dir")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended until the job ends")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    try:
        return logs(args.target, args.follow, args.interval)
    except ConfigError as e:
        return refused(e, queueing=False)


def logs(target: str, follow: bool = False, interval: float = 2.0) -> int:
    runs = [(run, read_status(run.status)) for run in resolve_runs(target)]
    runs = [(run, st) for run, st in runs if st.get("log")]
    if not runs:
        print(f"error: no Slurm log recorded for {target} (never submitted?)", file=sys.stderr)
        return 1
    if follow and len(runs) > 1:  # follow the one at work now: the last queued or running
        runs = [next((r for r in reversed(runs) if r[1].get("state") in ("queued", "running", "preempted")), runs[-1])]
    for run, st in runs:
        log = Path(st["log"])
        if len(runs) > 1:
            print(f"==> {run.name}: {log} <==", flush=True)
        if not follow:
            if log.is_file():
                sys.stdout.write(log.read_text(errors="replace"))
            else:
                print(f"({log} does not exist yet: job {current_job(st) or '?'} has not started)")
            continue
        return tail(log, current_job(st), interval)
    return 0


def tail(log: Path, job: str | None, interval: float) -> int:
    """Print the log and what is appended to it until Slurm says the job has ended (Ctrl-C stops)."""
    pos = 0
    try:
        while True:
            ended = slurm_state(job) not in ALIVE  # asked before reading: the last lines are read after it ended
            if log.is_file():
                with open(log, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                if chunk:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            if ended:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
