"""Who owns an output_dir: a lock per dir, and the identity of the run whose files are in it.

- The lock is an flock on `<parent>/.<name>.lock` beside the resolved dir (so the dir itself can be
  moved aside, and every spelling of the path meets the same lock), held for the process lifetime; the
  file names the holder (job id, host, pid and its start time). A second writer is refused with a line
  naming it; the kernel releases the lock when its holder dies, so nothing is "taken over".
- `run.json` in the dir says which run wrote it: a hash of the config (RUN_FIELDS excluded), its starts,
  and the top-level names it wrote (`files`). A run resumes only its own checkpoints; a finished run is
  final (FINISHED: exit 0) unless `overwrite: true`. `overwrite` moves a run's dir aside in one rename
  only when everything in it is that run's, and deletes it (with any the run replaced before) only once
  the new run has finished; nothing of it mixes with the new one.
"""

from __future__ import annotations

import fcntl
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
from hpcnlp.runtime.checkpoints import checkpoints, is_complete
from hpcnlp.runtime.io import atomic_write_json

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TRACKING_KEY = "tracking"  # run.json: {"mlflow_run_id": ..., "wandb_run_id": ...}, kept across requeues
OWN_FILES = {RUN_FILE, "status.json", ".heartbeat", ".preempt"}  # bookkeeping, not results
RESULT = "metrics.json"  # a training run's result: written last, it marks the run finished
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


class Finished(Exception):
    """The run in output_dir is already finished: nothing to do (the job exits 0 saying so)."""


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
    inputs = {}
    for k in INPUT_FIELDS:
        value = config.get(k)
        if isinstance(value, str) and (ident := input_identity(value)) is not None:
            inputs[k] = ident
        elif isinstance(value, list) and any(idents := [input_identity(v) for v in value if isinstance(v, str)]):
            inputs[k] = idents  # an ensemble of teachers
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
_held: dict[str, int] = {}  # resolved output_dir -> the open lock file whose flock this process holds


def real(path: str | Path) -> Path:
    """A path's identity: every spelling (symlinks, `..`, relative) of one dir gives the same path."""
    return Path(os.path.realpath(path))


def lock_path(output_dir: str | Path) -> Path:
    out = real(output_dir)
    return out.parent / f".{out.name}.lock"


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc): with its pid it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {
        "slurm_job_id": env.slurm_job_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and holder else None


def lock_holder(output_dir: str | Path) -> dict | None:
    """Who holds (or last held) the output_dir's lock (job id, host, pid, start); None: nobody."""
    try:
        return _parse(lock_path(output_dir).read_text())
    except OSError:
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    job = f"job {holder['slurm_job_id']} " if holder.get("slurm_job_id") else ""
    return f"{job}pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def record_alive(holder: dict | None) -> bool:
    """Whether the process a holder record names runs, where no flock can say: on its host its pid (and
    start time) says; elsewhere Slurm, and a scheduler that does not answer means alive."""
    if not holder:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True  # another user's
        start = holder.get("pid_start")
        return start is None or start == _start_time(int(holder["pid"]))  # else: the pid was reused
    job = holder.get("slurm_job_id")
    if not job:
        return True  # another host, no job to ask about
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if out.returncode == 0:
        return bool(out.stdout.strip())  # squeue lists only jobs not yet ended
    return "invalid job id" not in out.stderr.lower()  # "Unable to contact slurm controller": alive


def holder_alive(output_dir: str | Path) -> bool | None:
    """Whether a process holds the output_dir's lock now; None: there is no lock file. The kernel
    releases a flock when its holder dies (kill -9 too), so a free lock is a dead holder."""
    if str(real(output_dir)) in _held:
        return True
    try:
        fd = os.open(lock_path(output_dir), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: the record says
        return record_alive(_parse(os.pread(fd, 4096, 0).decode(errors="replace")))
    finally:
        os.close(fd)


def acquire(output_dir: str | Path) -> Path:
    """Take the output_dir's lock for this process's lifetime or raise OutputDirRefused naming the holder.

    An flock on `<parent>/.<name>.lock` (of the resolved dir): the kernel drops it when the holder dies,
    so there is no stale lock to take over, and the file is never deleted (a waiter on a deleted file
    and a process on its successor would both hold "the" lock). The file says who holds it."""
    key, path = str(real(output_dir)), lock_path(output_dir)
    if key in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        os.close(fd)
        raise OutputDirRefused(
            f"'{output_dir}' is in use by {_describe(holder)} (lock {path})",
            "wait for that run to end, or choose another output_dir",
        ) from None
    except OSError as e:  # no flock on this filesystem (e.g. Lustre mounted noflock): the record only
        holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if holder and holder.get("pid") != os.getpid() and record_alive(holder):
            os.close(fd)
            raise OutputDirRefused(
                f"'{output_dir}' is in use by {_describe(holder)} (lock {path})",
                "wait for that run to end, or choose another output_dir",
            ) from None
        log.warning("%s: no flock here (%s): the lock is only a record, two starts at once may both run", path, e)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    _held[key] = fd
    return path


def holds(output_dir: str | Path) -> bool:
    """This process holds the output_dir's lock."""
    return str(real(output_dir)) in _held


def release(output_dir: str | Path) -> None:
    fd = _held.pop(str(real(output_dir)), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # nobody holds it now; the file stays (see acquire)
        os.close(fd)


# --- owning the dir: the names a run wrote ------------------------------------------------------
def _bookkeeping(name: str) -> bool:
    """Names every run may leave whatever else it wrote: its records and atomic writes' leftovers."""
    return name in OWN_FILES or (name.startswith(".") and name.endswith(".tmp"))


def entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not _bookkeeping(p.name)) if out.is_dir() else []


def foreign(out: Path, run: dict | None) -> list[str]:
    """What is in `out` that its run did not record as written by it (a user's notes, data)."""
    own = set((run or {}).get("files") or [])
    return [n for n in entries(out) if n not in own]


def record_files(output_dir: str | Path, *names: str) -> None:
    """The lock holder notes in run.json the top-level names its run has written (all there now but
    those it found when it went on, or `names`): overwrite and cleanup touch only those. A name put into
    the dir while the run runs counts as the run's."""
    out = real(output_dir)
    run = read_run(out)
    if run is None or not holds(out):
        return
    now = (set(names) if names else set(entries(out))) - set(run.get("kept") or [])
    files = sorted(set(run.get("files") or []) | now)
    if files != run.get("files"):
        atomic_write_json(out / RUN_FILE, {**run, "files": files})


def _replaced(run: dict | None) -> list[str]:
    """The runs overwrite moved aside that a run must delete once finished (older run.json: one or None)."""
    value = (run or {}).get("replaced")
    return [value] if isinstance(value, str) else list(value or [])


# --- claiming the dir for a run ----------------------------------------------------------------
FRESH, CONTINUE, REPLACE, FINISHED = "fresh", "continue", "replace", "finished"


def is_finished(out: Path, run: str, max_steps: int | None, resume: str, result: str = RESULT) -> bool:
    """The run's result exists, or its newest complete checkpoint is at or past max_steps. With
    `resume: continue` only the checkpoint counts: a raised max_steps continues a finished run."""
    done = [step for step, p in checkpoints(out) if is_complete(p, run)]
    past = bool(max_steps and max_steps > 0 and done and done[-1] >= max_steps)
    return past if resume == "continue" else past or (out / result).exists()


def verdict(
    output_dir: str | Path,
    run: str,
    overwrite: bool,
    resume: str,
    restarted: bool = False,
    max_steps: int | None = None,
) -> str:
    """What a start of `run` does with output_dir: FRESH (nothing there), CONTINUE (its own run),
    REPLACE (overwrite: another run, or a finished one, moved aside) or FINISHED (nothing to do, exit 0).
    Raises OutputDirRefused otherwise. `hpcnlp check` and the job both ask this (check = run); a
    requeued start too: only this very job's earlier start is continued without a look."""
    out = real(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirRefused(f"'{output_dir}' is a file", "choose a directory path")
    names = entries(out)
    if not names:
        return FRESH
    previous = read_run(out)
    mine = previous is not None and previous.get("run") == run
    this_job = (
        mine
        and restarted
        and env.slurm_job_id() is not None
        and any(s.get("slurm_job_id") == env.slurm_job_id() for s in previous.get("starts") or [])
    )
    done = mine and is_finished(out, run, max_steps, resume)
    if this_job:
        return FINISHED if done else CONTINUE
    if overwrite:
        alien = foreign(out, previous)
        if alien:
            raise OutputDirRefused(
                f"'{output_dir}' holds files hpcnlp did not write: {', '.join(alien[:5])}"
                + (f" and {len(alien) - 5} more" if len(alien) > 5 else ""),
                "move them out of it, or choose another output_dir (overwrite replaces only what a run recorded)",
            )
        return REPLACE
    if previous is None:
        raise OutputDirRefused(
            f"'{output_dir}' holds files hpcnlp did not write",
            "choose another output_dir: no job writes into, or replaces, what it did not create",
        )
    if not mine:
        raise OutputDirRefused(
            f"'{output_dir}' holds a run of another config (run {previous.get('run')}): its files are not this run's",
            "set overwrite: true to replace it, or choose a new output_dir",
        )
    if done:
        return FINISHED
    if restarted or resume != "never":
        return CONTINUE
    raise OutputDirRefused(
        f"'{output_dir}' holds checkpoints of an unfinished run",
        "set resume: auto to continue it, or overwrite: true to start over",
    )


def claim(
    output_dir: str | Path,
    run: str,
    overwrite: bool,
    job: str,
    resume: str = "never",
    restarted: bool = False,
    max_steps: int | None = None,
) -> str:
    """Make output_dir this run's (lock held); returns the verdict (FINISHED: the caller stops, exit 0).
    A run that overwrite moves aside is named in run.json with those it had not deleted yet itself, so
    whichever start of this run finishes deletes them all (`finish`): none is left behind."""
    out = real(output_dir)
    what = verdict(out, run, overwrite, resume, restarted, max_steps)
    if what == FINISHED:
        return what
    previous = read_run(out)
    replaced = _replaced(previous)  # whatever start made the dir: runs moved aside are carried forward
    if what == REPLACE:
        aside = out.parent / f".{out.name}.replaced-{time.time_ns()}"
        os.replace(out, aside)  # the resolved dir: a symlink to it stays, and points at the new run
        replaced.append(str(aside))
        log.warning("overwrite: the previous run in %s moved to %s; deleted once this run has finished", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    same = what == CONTINUE
    atomic_write_json(
        out / RUN_FILE,
        {
            "run": run,
            "job": job,
            "replaced": replaced,
            "files": (previous or {}).get("files", []) if same else [],
            # what was there, not the run's, when it went on: never recorded as its own later
            "kept": foreign(out, previous) if same else [],
            "started": (previous or {}).get("started") if same else time.strftime("%Y-%m-%d %H:%M:%S"),
            TRACKING_KEY: (previous or {}).get(TRACKING_KEY) if same else None,  # a requeue logs into the same runs
            "starts": [
                *((previous or {}).get("starts", []) if same else []),
                {
                    "slurm_job_id": env.slurm_job_id(),
                    "restart": env.slurm_restart_count(),
                    "host": socket.gethostname(),
                    "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "code_version": env.code_version(),
                },
            ],
        },
    )
    return what


def tracking_ids(output_dir: str | Path) -> dict:
    """The MLflow / W&B run ids this run logs into (train/tracking.py); {} before its first start."""
    return dict((read_run(output_dir) or {}).get(TRACKING_KEY) or {})


def record_tracking(output_dir: str | Path, **ids: str) -> None:
    """Keep tracking run ids in run.json, so a requeued start continues the same MLflow / W&B run."""
    run = read_run(output_dir) or {}
    atomic_write_json(Path(output_dir) / RUN_FILE, {**run, TRACKING_KEY: {**tracking_ids(output_dir), **ids}})


def finish(output_dir: str | Path) -> None:
    """The run has finished: its names are recorded, and the runs it replaced (overwrite) deleted now."""
    out = real(output_dir)
    record_files(out)
    run = read_run(out) or {}
    for path in _replaced(run):
        aside = Path(path)
        if aside.is_dir() and not aside.is_symlink() and aside.name.startswith(f".{out.name}.replaced-"):
            shutil.rmtree(aside)
            log.info("overwrite: deleted the previous run %s", aside)
    if run.get("replaced"):
        atomic_write_json(out / RUN_FILE, {**run, "replaced": []})
