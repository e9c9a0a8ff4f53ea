"""Who owns an output_dir: a lock per dir, and the identity of the run whose files are in it.

- The lock `<parent>/.<name>.lock` (beside the dir, so the dir itself can be moved aside) holds the
  writer's job id, host and pid. A second writer is refused with a line naming the holder; a lock
  whose holder is gone (same host and the pid is dead, its Slurm job is over, or it is this very job
  before a requeue) is taken over.
- `run.json` in the dir says which run wrote it: a hash of the config (RUN_FIELDS excluded), job id,
  start. A run resumes only its own checkpoints. `overwrite: true` moves another run's dir aside in
  one rename and deletes it only once the new run has finished; nothing of it mixes with the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import yaml

from hpcnlp.runtime import env
from hpcnlp.runtime.io import atomic_write_json

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TRACKING_KEY = "tracking"  # run.json: {"mlflow_run_id": ..., "wandb_run_id": ...}, kept across requeues
OWN_FILES = {RUN_FILE, "status.json", ".heartbeat"}  # bookkeeping, not results
# Settings that change how long or how a run is carried out, not what it learns: a run continued
# with another value of these is still the same run (e.g. more max_steps, another logging cadence).
RUN_FIELDS = {
    "resume",
    "overwrite",
    "max_requeues",
    "step_timeout_minutes",
    "training.max_steps",
    "training.num_train_epochs",
    "training.logging_steps",
    "training.save_steps",
    "training.eval_steps",
    "training.save_total_limit",
    "training.report_to",
    "tracking",
    "training.ddp_timeout",
    "training.dataloader_num_workers",
    "data.num_proc",
}


class OutputDirRefused(Exception):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


INPUT_FIELDS = ("model_name_or_path", "teacher")  # the weights a run starts from


def input_identity(path: str) -> list | None:
    """Which run's weights an hpcnlp output dir holds now (its run and its weight files' size and
    mtime); None for anything else (a package alias, a foreign model dir: fixed inputs)."""
    p = Path(path)
    run = read_run(p) if p.is_dir() else None
    if run is None:
        return None
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    return [run.get("run"), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def run_hash(config: dict) -> str:
    """Identity of what a config trains: its resolved values minus RUN_FIELDS, plus which run's weights
    its inputs hold when they are outputs of earlier hpcnlp jobs. So when a pipeline re-runs an upstream
    stage, a later stage with the same config is another run: it never continues its old checkpoints
    on top of the new upstream model (it is refused, or replaced with overwrite: true)."""

    def strip(node: dict, prefix: str = "") -> dict:
        return {
            k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in node.items()
            if f"{prefix}{k}" not in RUN_FIELDS
        }

    key = strip(config)
    inputs = {
        k: ident
        for k in INPUT_FIELDS
        if isinstance(config.get(k), str) and (ident := input_identity(config[k])) is not None
    }
    if inputs:  # absent otherwise: configs on fixed inputs keep the hash they always had
        key["_inputs"] = inputs
    return hashlib.sha256(yaml.safe_dump(key, sort_keys=True).encode()).hexdigest()[:16]


def read_run(output_dir: str | Path) -> dict | None:
    try:
        run = json.loads((Path(output_dir) / RUN_FILE).read_text())
        return run if isinstance(run, dict) else None
    except (OSError, ValueError):
        return None


# --- the lock ----------------------------------------------------------------------------------
def lock_path(output_dir: str | Path) -> Path:
    out = Path(output_dir).absolute()
    return out.parent / f".{out.name}.lock"


def lock_holder(output_dir: str | Path) -> dict | None:
    """Who holds the output_dir's lock now (job id, host, pid, since); None: nobody."""
    try:
        holder = json.loads(lock_path(output_dir).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def process_alive(holder: dict | None) -> bool | None:
    """Whether a lock holder's process still runs: known only on its own host (None elsewhere)."""
    if not holder or holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder.get("pid", 0)), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True


def _holder_gone(holder: dict) -> bool:
    job = holder.get("slurm_job_id")
    if job and job == env.slurm_job_id():
        return True  # this job before a requeue (or the batch step that launched us)
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
            return False
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False  # alive, another user's
    if job:
        try:
            out = subprocess.run(
                ["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30
            )
            return out.returncode != 0 or not out.stdout.strip()  # squeue knows only jobs not yet ended
        except (OSError, subprocess.TimeoutExpired):
            return False
    return False  # another host, no job id to ask about: assume it runs


def acquire(output_dir: str | Path) -> Path:
    """Take the output_dir's lock or raise OutputDirRefused naming the holder."""
    path = lock_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "slurm_job_id": env.slurm_job_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if not _holder_gone(holder) and holder:
                who = (
                    f"job {holder.get('slurm_job_id')} " if holder.get("slurm_job_id") else ""
                ) + f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                raise OutputDirRefused(
                    f"'{output_dir}' is in use by {who} (lock {path})",
                    "wait for that run to end, or choose another output_dir",
                ) from None
            log.warning("taking over the lock of %s from %s (gone)", output_dir, holder or "an unreadable lock")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise OutputDirRefused(f"'{output_dir}': could not take the lock {path}", "try again")


def release(output_dir: str | Path) -> None:
    path = lock_path(output_dir)
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


# --- claiming the dir for a run ----------------------------------------------------------------
def written_by_hpcnlp(out: Path) -> bool:
    """A run's dir: run.json, or (runs from before run.json) metrics.json or checkpoints."""
    return any((out / name).exists() for name in (RUN_FILE, "metrics.json")) or any(out.glob("checkpoint-*"))


def claim(output_dir: str | Path, run: str, overwrite: bool, job: str, continuing: bool) -> None:
    """Make output_dir this run's (lock held). `continuing`: a requeue or `resume:` run, which goes on
    with the files of its own run (same config). A previous run that overwrite moves aside is named in
    run.json, so whichever start of this run finishes it deletes it (`finish`)."""
    out = Path(output_dir)
    previous = read_run(out)
    aside = None
    has_files = out.is_dir() and any(p.name not in OWN_FILES for p in out.iterdir())
    same = continuing and (previous or {}).get("run") == run
    if has_files and not same and overwrite:
        if not written_by_hpcnlp(out):
            raise OutputDirRefused(
                f"'{out}' holds files hpcnlp did not write",
                "choose another output_dir (overwrite replaces only runs hpcnlp wrote)",
            )
        aside = out.parent / f".{out.name}.replaced-{int(time.time())}"
        os.replace(out, aside)
        log.warning("overwrite: the previous run in %s moved to %s; deleted once this run has finished", out, aside)
        previous = None
    out.mkdir(parents=True, exist_ok=True)
    starts = (previous or {}).get("starts", []) if same else []
    replaced = str(aside) if aside else (previous or {}).get("replaced") if same else None
    atomic_write_json(
        out / RUN_FILE,
        {
            "run": run,
            "job": job,
            "replaced": replaced,
            "started": (previous or {}).get("started") if same else time.strftime("%Y-%m-%d %H:%M:%S"),
            TRACKING_KEY: (previous or {}).get(TRACKING_KEY) if same else None,  # a requeue logs into the same runs
            "starts": [
                *starts,
                {
                    "slurm_job_id": env.slurm_job_id(),
                    "restart": env.slurm_restart_count(),
                    "host": socket.gethostname(),
                    "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            ],
        },
    )


def tracking_ids(output_dir: str | Path) -> dict:
    """The MLflow / W&B run ids this run logs into (train/tracking.py); {} before its first start."""
    return dict((read_run(output_dir) or {}).get(TRACKING_KEY) or {})


def record_tracking(output_dir: str | Path, **ids: str) -> None:
    """Keep tracking run ids in run.json, so a requeued start continues the same MLflow / W&B run."""
    run = read_run(output_dir) or {}
    atomic_write_json(Path(output_dir) / RUN_FILE, {**run, TRACKING_KEY: {**tracking_ids(output_dir), **ids}})


def finish(output_dir: str | Path) -> None:
    """The run has finished: the run it replaced (overwrite) is deleted now, not before."""
    run = read_run(output_dir) or {}
    aside = Path(run["replaced"]) if run.get("replaced") else None
    if aside is not None and aside.is_dir() and aside.name.startswith(f".{Path(output_dir).name}.replaced-"):
        shutil.rmtree(aside)
        log.info("overwrite: deleted the previous run %s", aside)
    if aside is not None:
        atomic_write_json(Path(output_dir) / RUN_FILE, {**run, "replaced": None})
