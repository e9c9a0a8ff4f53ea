"""`hpcnlp sweep`: check a job config for each override set, then queue one Slurm job array.

One array task per override set, each in <output_dir>/task-<i>. Each submission writes its own
manifest, <output_dir>/sweep-<time>-<id>.json, never rewritten: the array's tasks read the one named in
their environment (HPCNLP_SWEEP) and the launcher appends task i's overrides. <output_dir>/sweep.json is
the latest manifest's copy (with its name and array job id) for `hpcnlp status`, `summary`, `cancel`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

from hpcnlp.cluster.jobs_alive import FINAL, busy_problems, read_status, recorded_jobs
from hpcnlp.cluster.plan import plan, refused
from hpcnlp.cluster.profile import load_profile
from hpcnlp.cluster.submit import expand_log, snapshot
from hpcnlp.config import ConfigError
from hpcnlp.jobs import load_config, registry
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json

LATEST = "sweep.json"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="check a job config for each override set, then queue a job array")
    p.add_argument("--config", "-c", required=True)
    p.add_argument(
        "--overrides-list",
        nargs="+",
        required=True,
        metavar="'k=v k=v'",
        help="one quoted, space-separated override set per array task (put this option last)",
    )
    p.add_argument("--max-parallel", type=int, default=None, help="run at most K tasks at once (--array=..%%K)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION")
    p.add_argument("--dry-run", action="store_true", help="check every task and print the sbatch line; queue nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="queue even when the output_dir's earlier sweep still has tasks queued or running",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides common to all tasks")


def main(args: argparse.Namespace) -> int:
    try:
        sweep(
            args.config,
            args.overrides,
            [t.split() for t in args.overrides_list],
            args.max_parallel,
            args.sbatch,
            dry_run=args.dry_run,
            force=args.force,
        )
    except ConfigError as e:
        return refused(e)
    return 0


def sweep(
    config: str,
    overrides: list[str],
    tasks: list[list[str]],
    max_parallel: int | None,
    sbatch_args: list[str] = (),
    dry_run: bool = False,
    force: bool = False,
) -> str | None:
    """One array task per override set, each in <output_dir>/task-<i>; a manifest says which is which.
    One log per task: <log_dir>/<name>-<array id>_<task>.out."""
    cfg = load_config(config, overrides, check=False)  # the common config: what is frozen and submitted
    base = cfg.output_dir
    task_args = [[*t, f"output_dir={base}/task-{i}"] for i, t in enumerate(tasks)]
    for i, t in enumerate(task_args):  # each task's own config, checked as the task will run it
        try:
            load_config(config, [*overrides, *t])
        except ConfigError as e:
            raise ConfigError(f"{config} (sweep task {i}: {' '.join(tasks[i])})", e.problems) from None
    manifest = Path(base) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
    if not dry_run and not force:
        busy = sweep_busy(Path(base), len(tasks))
        if busy:
            raise ConfigError(config, busy)
    array = f"--array=0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    env = {"HPCNLP_SWEEP": str(manifest.absolute())}  # launch.py appends task i's overrides
    frozen = snapshot(cfg, config, overrides, write=not dry_run)
    sub = plan(
        cfg, registry()[cfg.job], load_profile(), frozen, config, list(sbatch_args), array=array, env=env
    ).checked()
    if dry_run:
        print(f"sweep: would submit an array of {len(tasks)} {cfg.job} tasks\n" + sub.describe())
        return None
    body = {"config": config, "overrides": overrides, "tasks": task_args}
    write_new(manifest, body)  # this submission's own: a queued array reads it until its last task starts
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    atomic_write_json(Path(base) / LATEST, {**body, "manifest": manifest.name, "job_id": job_id})
    spec = registry()[cfg.job]
    for i, t in enumerate(task_args):  # `hpcnlp status` says queued at once, with each task's log
        task_cfg = load_config(config, [*overrides, *t], check=False)
        status.update(
            spec.status_file(task_cfg),
            create=True,
            state="queued",
            job=cfg.job,
            queued_job_id=f"{job_id}_{i}",
            reason=None,
            log=log.replace("<task>", str(i)),
        )
    print(f"submitted array job {job_id} ({len(tasks)} tasks), logs {log}")
    return job_id


def write_new(path: Path, body: dict) -> None:
    """Write a file that must not exist yet (a manifest is never rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
        json.dump(body, f, indent=2)


def sweep_busy(base: Path, n_tasks: int) -> list:
    """The output_dir's earlier sweep (its array job, its tasks' jobs) still queued or running."""
    latest = read_status(base / LATEST)
    seen = [
        read_status(base / f"task-{i}" / "status.json") for i in range(max(n_tasks, len(latest.get("tasks") or [])))
    ]
    active = [st for st in seen if st and st.get("state") not in FINAL]
    jobs = [j for st in active for j in recorded_jobs(st)]
    if latest.get("job_id") and (active or not any(seen)):  # the array itself, unless all its tasks have ended
        jobs.insert(0, str(latest["job_id"]))
    return busy_problems(f"sweep '{base}'", list(dict.fromkeys(jobs)))
