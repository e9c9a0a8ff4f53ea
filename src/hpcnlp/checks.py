"""Meaning checks the jobs share: models that must load, resume targets, output dirs, DeepSpeed files.

Each returns a list of `Problem`s (one line each: key, what is wrong, the fix). `pending` holds paths
that earlier pipeline stages will create: those are not checked yet.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

from hpcnlp.config import JobConfig, Problem, TrainingConfig
from hpcnlp.models import ModelNotFound, resolve_model_path
from hpcnlp.runtime import env
from hpcnlp.runtime.checkpoints import is_complete
from hpcnlp.runtime.io import is_inside


def model(key: str, value: str | None, pending: Iterable[str]) -> list[Problem]:
    if value is None or is_inside(value, pending):
        return []
    try:
        resolve_model_path(value)
    except ModelNotFound as e:
        return [Problem(key=key, message=str(e), fix=e.fix)]
    return []


def model_config(name_or_path: str) -> dict | None:
    """A model's config.json, None when it cannot be read (the model check reports that)."""
    try:
        return json.loads((Path(resolve_model_path(name_or_path)) / "config.json").read_text())
    except (ModelNotFound, OSError, json.JSONDecodeError):
        return None


def resume(value: str) -> list[Problem]:
    if value in ("never", "auto"):
        return []
    if Path(value).is_dir() and is_complete(Path(value)):
        return []
    return [Problem(key="resume", message=f"'{value}' is neither never, auto nor a complete checkpoint dir",
                    fix="use resume: auto to pick the newest complete checkpoint in output_dir")]


def output_dir(cfg: JobConfig, resume_: str = "never", finished: str = "metrics.json") -> list[Problem]:
    """A dir holding a finished run or checkpoints is only reused when the config says how."""
    out = Path(cfg.output_dir)
    if cfg.overwrite or not out.exists() or env.slurm_restart_count() > 0:  # a requeue resumes its own run
        return []
    if (out / finished).exists() and resume_ == "never":
        return [Problem(key="output_dir", message=f"'{out}' holds a finished run ({finished})",
                        fix="set overwrite: true, resume: auto, or choose a new output_dir")]
    if any(out.glob("checkpoint-*")) and resume_ == "never":
        return [Problem(key="output_dir", message=f"'{out}' holds checkpoints of an unfinished run",
                        fix="set resume: auto to continue it, or overwrite: true to start over")]
    return []


def training(t: TrainingConfig, output_dir_: str) -> list[Problem]:
    """The DeepSpeed JSON, and TrainingArguments' own checks on the combination of values."""
    out = []
    if t.deepspeed:
        path = Path(t.deepspeed)
        if not path.is_file():
            out.append(Problem(key="training.deepspeed", message=f"no such file '{path}'",
                               fix="point it at a DeepSpeed JSON, e.g. jobs/deepspeed/zero2.json"))
        else:
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                out.append(Problem(key="training.deepspeed", message=f"'{path}' is not valid JSON ({e})",
                                   fix="fix the JSON syntax"))
    from transformers import TrainingArguments

    kwargs = {**t.model_dump(), "deepspeed": None}  # DeepSpeed is checked above; its set-up is the job's
    with _environ_kept():  # TrainingArguments exports ACCELERATE_* variables: none may leak from a check
        try:
            TrainingArguments(output_dir=output_dir_ or ".", use_cpu=True, **kwargs)
        except (ValueError, TypeError, ImportError) as e:
            out.append(Problem(key="training", message=f"TrainingArguments refuses these settings: {e}"
                               .replace("\n", " "), fix="change the keys it names (see transformers' "
                               "TrainingArguments documentation)"))
    return out


@contextlib.contextmanager
def _environ_kept():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
