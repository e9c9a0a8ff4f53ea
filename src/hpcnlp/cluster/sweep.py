"""`hpcnlp sweep`: check a job config for each override set, then queue one Slurm job array.

One array task per override set, each in <output_dir>/task-<i>; a manifest (<output_dir>/sweep.json)
says which is which, and the launcher appends task i's overrides (HPCNLP_SWEEP).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hpcnlp.cluster.plan import plan, refused
from hpcnlp.cluster.profile import load_profile
from hpcnlp.cluster.submit import expand_log, snapshot
from hpcnlp.config import ConfigError
from hpcnlp.jobs import load_config, registry
from hpcnlp.runtime.io import atomic_write_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="check a job config for each override set, then queue a job array")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--overrides-list", nargs="+", required=True, metavar="'k=v k=v'",
                   help="one quoted, space-separated override set per array task (put this option last)")
    p.add_argument("--max-parallel", type=int, default=None, help="run at most K tasks at once (--array=..%%K)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION")
    p.add_argument("--dry-run", action="store_true", help="check every task and print the sbatch line; queue nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides common to all tasks")


def main(args: argparse.Namespace) -> int:
    try:
        sweep(args.config, args.overrides, [t.split() for t in args.overrides_list], args.max_parallel,
              args.sbatch, dry_run=args.dry_run)
    except ConfigError as e:
        return refused(e)
    return 0


def sweep(config: str, overrides: list[str], tasks: list[list[str]], max_parallel: int | None,
          sbatch_args: list[str] = (), dry_run: bool = False) -> str | None:
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
    manifest = Path(base) / "sweep.json"
    array = f"--array=0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    env = {"HPCNLP_SWEEP": str(manifest.absolute())}  # launch.py appends task i's overrides
    frozen = snapshot(cfg, config, overrides, write=not dry_run)
    sub = plan(cfg, registry()[cfg.job], load_profile(), frozen, config, list(sbatch_args), array=array,
               env=env).checked()
    if dry_run:
        print(f"sweep: would submit an array of {len(tasks)} {cfg.job} tasks\n" + sub.describe())
        return None
    atomic_write_json(manifest, {"config": config, "overrides": overrides, "tasks": task_args})
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    print(f"submitted array job {job_id} ({len(tasks)} tasks), logs {log}")
    return job_id
