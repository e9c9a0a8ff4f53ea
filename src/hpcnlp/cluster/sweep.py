"""`hpcnlp sweep`: check a job config for each override set, then queue one Slurm job array.

The override sets are listed (--overrides-list) or a grid's cartesian product (--grid key=[v,...] ...,
--seeds adding a training.seed axis). One array task per override set, each in <output_dir>/task-<i>.
Each submission writes its own manifest, <output_dir>/sweep-<time>-<id>.json, never rewritten: the
array's tasks read the one named in their environment (HPCNLP_SWEEP) and the launcher appends task i's
overrides. <output_dir>/sweep.json is the latest manifest's copy (with its name and array job id) for
`hpcnlp status`, `summary`, `cancel`.
A grid's manifest also holds the grid ({key: [values]}), its seed axis (seed_key) and each task's point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time
import uuid
from pathlib import Path

import yaml

from hpcnlp.cluster.jobs_alive import FINAL, busy_problems, read_status, recorded_jobs
from hpcnlp.cluster.plan import plan, refused
from hpcnlp.cluster.profile import load_profile
from hpcnlp.cluster.submit import expand_log, snapshot
from hpcnlp.config import ConfigError, Problem
from hpcnlp.jobs import load_config, registry
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json

LATEST = "sweep.json"
SEED_KEY = "training.seed"  # --seeds' axis; `hpcnlp summary` averages over it
NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")  # what the overrides read as a number


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="check a job config for each override set, then queue a job array")
    p.add_argument("--config", "-c", required=True)
    p.add_argument(
        "--overrides-list",
        nargs="+",
        metavar="'k=v k=v'",
        help="one quoted, space-separated override set per array task (put this option last)",
    )
    p.add_argument(
        "--grid",
        nargs="+",
        metavar="'key=[v1,v2]'",
        help="instead of --overrides-list: one task per point of the grid, the cartesian product of the "
        "listed values (YAML list after '=')",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help=f"with --grid: a {SEED_KEY} axis, multiplying the grid"
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
        grid = sweep_grid(args.grid, args.seeds, args.overrides_list)
    except ConfigError as e:
        return refused(e, queueing=False)  # one line: nothing was checked yet
    try:
        sweep(
            args.config,
            args.overrides,
            grid_tasks(grid) if grid else [t.split() for t in args.overrides_list],
            args.max_parallel,
            args.sbatch,
            dry_run=args.dry_run,
            force=args.force,
            grid=grid,
        )
    except ConfigError as e:
        return refused(e)
    return 0


def _usage(message: str, fix: str) -> ConfigError:
    return ConfigError("hpcnlp sweep", [Problem(key="options", message=message, fix=fix)])


def grid_value(value):
    """A grid value as the manifest records it: what the override reads as a number is one (YAML reads
    5e-5 as text, OmegaConf as a float); a date or the like as text."""
    if isinstance(value, str) and NUMBER.fullmatch(value):
        return int(value.replace("_", "")) if re.fullmatch(r"[-+]?[\d_]+", value) else float(value.replace("_", ""))
    return json.loads(json.dumps(value, default=str))


def override_text(value) -> str:
    """A value written back as an override reads as itself (OmegaConf's dotlist: YAML)."""
    if isinstance(value, str):
        try:
            same = NUMBER.fullmatch(value) or yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value, default=str)


def sweep_grid(items: list[str] | None, seeds: list[int] | None, overrides_list: list[str] | None) -> dict | None:
    """{key: [(override text, value), ...]} of --grid (and --seeds, the last axis); None for --overrides-list.
    Exactly one of --grid and --overrides-list; anything else is refused."""
    if bool(items) == bool(overrides_list):
        raise _usage(
            "give exactly one of --grid and --overrides-list" + (", not both" if items else ""),
            "--grid 'training.learning_rate=[5e-5,1e-4]' ... or --overrides-list 'k=v k=v' ...",
        )
    if not items:
        if seeds:
            raise _usage("--seeds goes with --grid", f"use --grid, or add {SEED_KEY}=N to each override set")
        return None
    grid = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        try:
            values = yaml.safe_load(text) if eq else None
        except yaml.YAMLError:
            values = None
        if not key or not isinstance(values, list) or not values:
            raise _usage(f"--grid {item!r} is not key=[v1,v2,...]", f"write it as {key or 'key'}=[v1,v2], quoted")
        if key in grid:
            raise _usage(f"--grid names {key} twice", "give each key once, all its values in one list")
        grid[key] = [(override_text(v), grid_value(v)) for v in values]
    if seeds:
        if SEED_KEY in grid:
            raise _usage(f"{SEED_KEY} is in --grid and --seeds", "give the seeds once")
        grid[SEED_KEY] = [(str(s), s) for s in seeds]
    return grid


def grid_tasks(grid: dict) -> list[list[str]]:
    """The cartesian product, the last key fastest (a point's seeds are neighbours)."""
    return [[f"{k}={text}" for k, (text, _) in zip(grid, point)] for point in itertools.product(*grid.values())]


def grid_manifest(grid: dict) -> dict:
    """What the manifest records of a grid: its keys and values, its seed axis, each task's point."""
    return {
        "grid": {k: [v for _, v in values] for k, values in grid.items()},
        "seed_key": SEED_KEY if SEED_KEY in grid else None,
        "points": [{k: v for k, (_, v) in zip(grid, point)} for point in itertools.product(*grid.values())],
    }


def sweep(
    config: str,
    overrides: list[str],
    tasks: list[list[str]],
    max_parallel: int | None,
    sbatch_args: list[str] = (),
    dry_run: bool = False,
    force: bool = False,
    grid: dict | None = None,
) -> str | None:
    """One array task per override set, each in <output_dir>/task-<i>; a manifest says which is which
    (with `grid`, sweep_grid's: its keys, values and each task's point too).
    One log per task: <log_dir>/<name>-<array id>_<task>.out."""
    cfg = load_config(config, overrides, check=False)  # the common config: what is frozen and submitted
    base = cfg.output_dir
    foreign = not_a_sweeps(Path(base))
    if foreign:
        raise ConfigError(config, foreign)
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
        shape = " x ".join(f"{len(v)} {k}" for k, v in grid.items()) if grid else ""
        print(
            f"sweep: would submit an array of {len(tasks)} {cfg.job} tasks"
            + (f" ({shape})" if shape else "")
            + "\n"
            + sub.describe()
        )
        return None
    body = {"config": config, "overrides": overrides, **(grid_manifest(grid) if grid else {}), "tasks": task_args}
    write_new(manifest, body)  # this submission's own: a queued array reads it until its last task starts
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    atomic_write_json(Path(base) / LATEST, {**body, "manifest": manifest.name, "job_id": job_id})
    spec = registry()[cfg.job]
    for i, t in enumerate(task_args):  # `hpcnlp status` says queued at once, with each task's log
        task_cfg = load_config(config, [*overrides, *t], check=False)
        status.update_outside(
            spec.status_file(task_cfg),
            state="queued",
            job=cfg.job,
            queued_job_id=f"{job_id}_{i}",
            reason=None,
            log=log.replace("<task>", str(i)),
        )
    print(f"submitted array job {job_id} ({len(tasks)} tasks), logs {log}")
    return job_id


# What a sweep (and its tasks' runs) leave in its base output_dir: manifests, task dirs, their locks
# and the runs overwrite moved aside, atomic writes' leftovers.
SWEEP_NAMES = re.compile(r"^(sweep\.json|sweep-.+\.json|task-\d+|\.task-\d+\.(lock|replaced-\d+)|\..+\.tmp)$")


def not_a_sweeps(base: Path) -> list[Problem]:
    """A base output_dir holding anything a sweep did not write (a run, a user's files) is not written into."""
    base = Path(os.path.realpath(base))
    foreign = sorted(p.name for p in base.iterdir() if not SWEEP_NAMES.match(p.name)) if base.is_dir() else []
    if not foreign:
        return []
    return [
        Problem(
            key="output_dir",
            message=f"'{base}' holds files no sweep wrote: {', '.join(foreign[:5])}"
            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""),
            fix="choose another output_dir for the sweep (its tasks write <output_dir>/task-<i>)",
        )
    ]


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
