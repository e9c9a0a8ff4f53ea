"""Checkpoints: complete means marked, and only marked checkpoints of this run are resumed.

The Trainer writes a checkpoint in pieces (weights and trainer_state.json by rank 0, optimizer and
RNG states by every rank). `train.callbacks.CheckpointMarker` runs after each save: every rank fsyncs the files,
the ranks meet at a barrier, and rank 0 writes MARKER last (`mark_complete`), listing every file with its size and the
run it belongs to. At resume a checkpoint counts only when its marker parses, names this run, and
every listed file is there with its size; the newest such one is taken, and each newer one that
fails is skipped with one log line saying why.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from hpcnlp.runtime import env
from hpcnlp.runtime.io import atomic_write_json

log = logging.getLogger(__name__)
MARKER = "hpcnlp-checkpoint.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint's weights are called: the Trainer's safetensors (adapters: adapter_model.safetensors),
# DeepSpeed's per-rank model states.
WEIGHTS = (".safetensors", "model_states.pt")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _files(ckpt: Path) -> dict[str, int]:
    return {
        str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MARKER
    }


def problem(ckpt: Path, run: str | None = None) -> str | None:
    """Why `ckpt` cannot be resumed (None: it can). `run`: the run identity it must belong to."""
    try:
        marker = json.loads((ckpt / MARKER).read_text())
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        return f"incomplete ({Path(e.filename).name} missing)"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    step = int(_CKPT.match(ckpt.name).group(1)) if _CKPT.match(ckpt.name) else None
    if not isinstance(marker, dict) or marker.get("step") != step or state.get("global_step") != step:
        return "its marker or trainer_state.json names another step"
    if run is not None and marker.get("run") != run:
        return f"it belongs to another run ({marker.get('run')}; this run is {run})"
    files = marker.get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and type(s) is int for n, s in files.items()):
        return "its marker lists no files (or not as name: size)"
    if not any(n.endswith(WEIGHTS) for n in files):
        return "its marker lists no model weights"
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def is_complete(ckpt: Path, run: str | None = None) -> bool:
    return problem(ckpt, run) is None


def newest_complete_checkpoint(output_dir: str | Path, run: str | None = None) -> Path | None:
    for _, path in reversed(checkpoints(output_dir)):
        why = problem(path, run)
        if why is None:
            return path
        log.warning("not resuming from %s: %s", path, why)
    return None


def resume_target(resume: str, output_dir: str | Path, run: str | None, restarted: bool = False) -> str | None:
    """`resume` config value -> checkpoint path for Trainer.train(resume_from_checkpoint=...), or None.

    A job Slurm requeued (`restarted`) always resumes: that is the point of the requeue. `continue` is
    `auto` for a finished run whose max_steps was raised (rundir.verdict lets it train again).
    """
    if resume == "never" and not restarted:
        return None
    if resume not in ("never", "auto", "continue"):
        return resume  # checked by `hpcnlp check`: a complete checkpoint
    found = newest_complete_checkpoint(output_dir, run)
    return str(found) if found else None


def fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the directory entries themselves
    finally:
        os.close(fd)


def trained_bf16(ckpt: str | Path) -> bool | None:
    """Whether the run that wrote `ckpt` trained in bf16 (its marker says); None when it does not say
    (a marker from before hpcnlp recorded it, or none)."""
    try:
        marker = json.loads((Path(ckpt) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    value = marker.get("bf16") if isinstance(marker, dict) else None
    return value if isinstance(value, bool) else None


def mark_complete(ckpt: Path, run: str, bf16: bool | None = None) -> None:
    """Rank 0, once every rank's files are synced: the marker, written last and atomically. `bf16`: the
    dtype the run trains in, which a resumed `training.bf16: auto` run keeps (train/precision.py)."""
    fsync_tree(ckpt)
    atomic_write_json(
        ckpt / MARKER,
        {
            "step": int(_CKPT.match(ckpt.name).group(1)),
            "run": run,
            "bf16": bf16,
            "slurm_job_id": env.slurm_job_id(),
            "files": _files(ckpt),
        },
    )
