"""Which checkpoint to resume from: the newest *complete* one, never a half-written save."""
from __future__ import annotations

import re
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_complete(ckpt: Path) -> bool:
    # The Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG
    # states, so its presence (with weights) marks a save that finished.
    if not (ckpt / "trainer_state.json").is_file():
        return False
    has_weights = any((ckpt / w).is_file() for w in _WEIGHTS) or any(ckpt.glob("global_step*"))
    return has_weights


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resume_target(resume: str, output_dir: str | Path, restarted: bool = False) -> str | None:
    """`resume` config value -> checkpoint path for Trainer.train(resume_from_checkpoint=...), or None.

    A job Slurm requeued (`restarted`) always resumes: that is the point of the requeue.
    """
    if resume == "never" and not restarted:
        return None
    if resume not in ("never", "auto"):
        return resume
    found = newest_complete_checkpoint(output_dir)
    return str(found) if found else None
