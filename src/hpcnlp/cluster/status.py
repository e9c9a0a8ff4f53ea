"""`hpcnlp status`: state, step, loss, ETA, restarts and log of a run, a sweep or a pipeline, from
each run's status.json and what Slurm says of its job."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from hpcnlp.cluster.jobs_alive import ALIVE, FINAL, current_job, read_status, slurm_state
from hpcnlp.cluster.pipeline import load_pipeline
from hpcnlp.cluster.plan import refused
from hpcnlp.config import ConfigError, JobConfig, Problem, read_yaml
from hpcnlp.jobs import load_config, registry
from hpcnlp.report import markdown_table
from hpcnlp.runtime import rundir
from hpcnlp.spec import JobSpec

ACTIVE = {"queued", "running", "preempted"}  # status.json states that say a process is (about to be) at work


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="state, step, loss, ETA, restarts and log of a run, sweep or pipeline")
    p.add_argument("target", help="a run's output_dir, a sweep's output_dir, a job config or a pipeline YAML")
    p.add_argument("--watch", action="store_true", help="refresh until every stage has ended (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="--watch refresh period")


def main(args: argparse.Namespace) -> int:
    try:
        return show_status(args.target, args.interval if args.watch else None)
    except ConfigError as e:
        return refused(e, queueing=False)


def eta(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Run:
    """One run a target names: its name in the table, its status.json, and (from a config) its job."""

    name: str
    status: Path | None
    cfg: JobConfig | None = None
    spec: JobSpec | None = None
    output_dir: Path | None = None


def resolve_runs(target: str) -> list[Run]:
    """The runs of a target of `hpcnlp status`, `cancel`, `logs`: a pipeline YAML (one per stage), a job
    config, a sweep's output_dir (one per task), or a run's output_dir."""
    p = Path(target)
    if p.is_file():
        raw = read_yaml(p)
        jobs = registry()
        if "stages" in raw:
            return [
                Run(
                    st.name,
                    jobs[st.cfg.job].status_file(st.cfg),
                    st.cfg,
                    jobs[st.cfg.job],
                    Path(st.cfg.output_dir) if st.cfg.output_dir else None,
                )
                for st in load_pipeline(target, check=False)
            ]
        cfg = load_config(target, check=False)
        return [
            Run(
                cfg.job,
                jobs[cfg.job].status_file(cfg),
                cfg,
                jobs[cfg.job],
                Path(cfg.output_dir) if cfg.output_dir else None,
            )
        ]
    if (p / "sweep.json").is_file():
        tasks = json.loads((p / "sweep.json").read_text())["tasks"]
        return [
            Run(f"task-{i}", p / f"task-{i}" / "status.json", output_dir=p / f"task-{i}") for i in range(len(tasks))
        ]
    if not (p / "status.json").is_file():
        raise ConfigError(
            target,
            [
                Problem(
                    key="<target>",
                    message="no status.json there, and not a config",
                    fix="give a run's or a sweep's output_dir, a job config or a pipeline YAML",
                )
            ],
        )
    return [Run(p.name, p / "status.json", output_dir=p)]


def stale(st: dict, slurm: str | None, output_dir: Path | None) -> bool:
    """status.json says queued or running, but nothing works on the run: its Slurm job is over or
    forgotten (or there is none) and the process that held the run's lock is gone (or there is no lock)."""
    if st.get("state") not in ACTIVE or slurm in ALIVE:
        return False
    alive = rundir.holder_alive(output_dir) if output_dir else None
    if alive is not None:  # the lock's flock says (the kernel freed it when its holder died, kill -9 too)
        return not alive
    return slurm is not None  # Slurm answered: the job is over or forgotten (None: no Slurm to ask here)


def status_row(
    name: str,
    path: Path | None,
    cfg: JobConfig | None = None,
    spec: JobSpec | None = None,
    output_dir: Path | None = None,
) -> dict:
    st = read_status(path)
    job = current_job(st)
    slurm = slurm_state(job)
    step = f"{st['step']}/{st.get('max_steps', '?')}" if "step" in st else ""
    loss = st.get("loss")
    state = st.get("state", "not started")
    if stale(st, slurm, output_dir or (path.parent if path else None)):
        state = "stale: process gone"
    elif cfg is not None and spec is not None and state == "not started" and spec.is_complete(cfg):
        state = "complete"  # what `hpcnlp pipeline` skips (prepare's shared data has no status.json)
    return {
        "stage": name,
        "state": state,
        "slurm": slurm or "",
        "job id": job or "",
        "step": step,
        "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
        "ETA": eta(st.get("eta_seconds")) if state == "running" else "",
        "restarts": st.get("restarts", ""),
        "log": st.get("log", ""),
        "reason": st.get("reason") or "",
    }


def status_rows(target: str) -> list[dict]:
    """Rows of `hpcnlp status`, one per run of the target (resolve_runs)."""
    return [status_row(r.name, r.status, r.cfg, r.spec, r.output_dir) for r in resolve_runs(target)]


def show_status(target: str, watch: float | None = None) -> int:
    while True:
        rows = status_rows(target)
        keys = [
            k
            for k in ("stage", "state", "slurm", "job id", "step", "loss", "ETA", "restarts", "log", "reason")
            if k in ("stage", "state") or any(r[k] not in ("", None) for r in rows)
        ]
        table = markdown_table(rows, keys)
        if watch is None:
            print(table)
            return 0
        head = f"{time.strftime('%H:%M:%S')} hpcnlp status {target} (every {watch:g} s; Ctrl-C stops)"
        print(f"\033[H\033[2J{head}\n{table}", flush=True)  # clear the screen, then the table
        if all(
            (r["state"] in FINAL or r["state"] in ("complete", "stale: process gone")) and r["slurm"] not in ALIVE
            for r in rows
        ):
            return 0
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0
