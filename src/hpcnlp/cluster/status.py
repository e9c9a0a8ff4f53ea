"""`hpcnlp status`: state, step, loss, ETA, restarts and log of a run, a sweep or a pipeline, from
each run's status.json and what Slurm says of its job."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from hpcnlp.cluster.pipeline import load_pipeline
from hpcnlp.cluster.plan import refused
from hpcnlp.config import ConfigError, Problem, read_yaml
from hpcnlp.jobs import load_config, registry
from hpcnlp.report import markdown_table

FINAL = {"finished", "failed", "rejected"}


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


def slurm_state(job_id: str | None) -> str:
    """The job's state as Slurm knows it: squeue (pending, running, recently ended), else sacct; '' when
    there is no Slurm here or it has forgotten the job."""
    if not job_id or not shutil.which("squeue"):
        return ""
    for cmd in (["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()[0]
    return ""


def current_job(st: dict) -> str | None:
    """The job id working on the run now: the one submitted last, unless a later one already ran."""
    ran = st.get("slurm_job_ids") or []
    queued = st.get("queued_job_id")
    return queued if queued and queued not in ran else (ran[-1] if ran else queued)


def eta(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def status_row(name: str, path: Path | None) -> dict:
    try:
        st = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        st = {}
    job = current_job(st)
    step = f"{st['step']}/{st.get('max_steps', '?')}" if "step" in st else ""
    loss = st.get("loss")
    return {"stage": name, "state": st.get("state", "not started"), "slurm": slurm_state(job), "job id": job or "",
            "step": step, "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
            "ETA": eta(st.get("eta_seconds")) if st.get("state") == "running" else "",
            "restarts": st.get("restarts", ""), "log": st.get("log", ""), "reason": st.get("reason") or ""}


def status_rows(target: str) -> list[dict]:
    """Rows of `hpcnlp status`: a pipeline YAML (one per stage), a job config, a sweep's output_dir (one
    per task), or a run's output_dir."""
    p = Path(target)
    if p.is_file():
        raw = read_yaml(p)
        jobs = registry()
        if "stages" in raw:
            stages = load_pipeline(target, check=False)
            return [status_row(st.name, jobs[st.cfg.job].status_file(st.cfg)) for st in stages]
        cfg = load_config(target, check=False)
        return [status_row(cfg.job, jobs[cfg.job].status_file(cfg))]
    if (p / "sweep.json").is_file():
        tasks = json.loads((p / "sweep.json").read_text())["tasks"]
        return [status_row(f"task-{i}", p / f"task-{i}" / "status.json") for i in range(len(tasks))]
    if not (p / "status.json").is_file():
        raise ConfigError(target, [Problem(key="<target>", message="no status.json there, and not a config",
                                           fix="give a run's or a sweep's output_dir, a job config or a pipeline YAML")])
    return [status_row(p.name, p / "status.json")]


def show_status(target: str, watch: float | None = None) -> int:
    while True:
        rows = status_rows(target)
        keys = [k for k in ("stage", "state", "slurm", "job id", "step", "loss", "ETA", "restarts", "log", "reason")
                if k in ("stage", "state") or any(r[k] not in ("", None) for r in rows)]
        table = markdown_table(rows, keys)
        if watch is None:
            print(table)
            return 0
        head = f"{time.strftime('%H:%M:%S')} hpcnlp status {target} (every {watch:g} s; Ctrl-C stops)"
        print(f"\033[H\033[2J{head}\n{table}", flush=True)  # clear the screen, then the table
        if all(r["state"] in FINAL and r["slurm"] in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for r in rows):
            return 0
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0
