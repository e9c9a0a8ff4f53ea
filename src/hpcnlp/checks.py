"""Meaning checks the jobs share: models that must load, resume targets, output dirs, DeepSpeed files.

Each returns a list of `Problem`s (one line each: key, what is wrong, the fix). `pending` holds paths
that earlier pipeline stages will create: those are not checked yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from hpcnlp.config import JobConfig, Problem, TrainingConfig
from hpcnlp.models import ModelNotFound, resolve_model_path
from hpcnlp.runtime import env, rundir
from hpcnlp.runtime.checkpoints import problem
from hpcnlp.runtime.io import is_inside
from hpcnlp.train import precision

log = logging.getLogger(__name__)


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


# These models number positions from pad_token_id + 1, so two of max_position_embeddings are never usable.
POSITION_OFFSET_MODELS = {"roberta", "xlm-roberta", "camembert"}


def max_seq_length(value: int, model_key: str, name_or_path: str | None, pending: Iterable[str]) -> list[Problem]:
    """data.max_seq_length within the model's position embeddings (longer inputs fail mid-run, in CUDA)."""
    if name_or_path is None or is_inside(name_or_path, pending):
        return []
    config = model_config(name_or_path) or {}
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or config.get("position_biased_input") is False:
        return []  # no config.json (the model check reports it) or no absolute positions (DeBERTa-v2/v3)
    if config.get("model_type") in POSITION_OFFSET_MODELS:
        limit -= 2
    if value <= limit:
        return []
    return [
        Problem(
            key="data.max_seq_length",
            message=f"{value} is longer than the {limit} positions of {model_key} '{name_or_path}'",
            fix=f"set data.max_seq_length to {limit} or less",
        )
    ]


def resume(cfg: JobConfig) -> list[Problem]:
    """An explicit `resume: <dir>` is a complete checkpoint of this run (same config)."""
    value = cfg.resume
    if value in ("never", "auto"):
        return []
    why = problem(Path(value), rundir.run_hash(cfg.model_dump(mode="json"))) if Path(value).is_dir() else "no such dir"
    if why is None:
        return []
    return [
        Problem(
            key="resume",
            message=f"'{value}' is not a complete checkpoint of this run: {why}",
            fix="use resume: auto (the newest complete checkpoint in output_dir); to start from other "
            "weights, set model_name_or_path to them",
        )
    ]


def output_dir(cfg: JobConfig, resume_: str = "never", finished: str = "metrics.json") -> list[Problem]:
    """Only this job's own runs are continued or replaced; nothing else is written into or removed."""
    out = Path(cfg.output_dir)
    if not out.is_dir() or env.slurm_restart_count() > 0:  # a requeue goes on with its own run
        return (
            []
            if not out.exists() or out.is_dir()
            else [Problem(key="output_dir", message=f"'{out}' is a file", fix="choose a directory path")]
        )
    if not any(p.name not in rundir.OWN_FILES for p in out.iterdir()):
        return []
    if not rundir.written_by_hpcnlp(out):
        return [
            Problem(
                key="output_dir",
                message=f"'{out}' holds files hpcnlp did not write",
                fix="choose another output_dir: no job writes into, or replaces, what it did not create",
            )
        ]
    if cfg.overwrite:
        return []
    previous = rundir.read_run(out)
    if resume_ != "never":
        if previous and previous.get("run") != rundir.run_hash(cfg.model_dump(mode="json")):
            return [
                Problem(
                    key="output_dir",
                    message=f"'{out}' holds a run of another config (run "
                    f"{previous.get('run')}): its checkpoints are not this run's",
                    fix="set overwrite: true to replace it, or choose a new output_dir",
                )
            ]
        return []
    if (out / finished).exists():
        return [
            Problem(
                key="output_dir",
                message=f"'{out}' holds a finished run ({finished})",
                fix="set overwrite: true, resume: auto, or choose a new output_dir",
            )
        ]
    return [
        Problem(
            key="output_dir",
            message=f"'{out}' holds checkpoints of an unfinished run",
            fix="set resume: auto to continue it, or overwrite: true to start over",
        )
    ]


def overlaps(output: str, inputs: dict[str, str | None], key: str = "output_dir") -> list[Problem]:
    """An output dir that is, holds or lies in one of the job's inputs would be written over them."""
    out = []
    for name, value in inputs.items():
        if not value:
            continue
        try:
            path = resolve_model_path(value) if name.endswith(("model_name_or_path", "teacher")) else value
        except ModelNotFound:
            path = value
        if is_inside(output, [path]) or is_inside(path, [output]):
            out.append(
                Problem(
                    key=key,
                    message=f"'{output}' overlaps the input {name} '{value}'",
                    fix=f"write {key} elsewhere: a job never writes over its inputs",
                )
            )
    return out


def training(t: TrainingConfig, output_dir_: str) -> list[Problem]:
    """The DeepSpeed JSON, and TrainingArguments' own checks on the combination of values."""
    out = []
    if t.deepspeed:
        path = Path(t.deepspeed)
        if not path.is_file():
            out.append(
                Problem(
                    key="training.deepspeed",
                    message=f"no such file '{path}'",
                    fix="point it at a DeepSpeed JSON, e.g. jobs/deepspeed/zero2.json",
                )
            )
        else:
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                out.append(
                    Problem(
                        key="training.deepspeed", message=f"'{path}' is not valid JSON ({e})", fix="fix the JSON syntax"
                    )
                )
    from transformers import TrainingArguments

    kwargs = {
        **t.model_dump(),
        "deepspeed": None,
        "bf16": t.bf16 is True,  # auto: decided at the job's start (bf16_advice says what this node picks)
    }  # DeepSpeed is checked above; its set-up is the job's
    with _environ_kept():  # TrainingArguments exports ACCELERATE_* variables: none may leak from a check
        try:
            TrainingArguments(output_dir=output_dir_ or ".", use_cpu=True, **kwargs)
        except (ValueError, TypeError, ImportError) as e:
            out.append(
                Problem(
                    key="training",
                    message=f"TrainingArguments refuses these settings: {e}".replace("\n", " "),
                    fix="change the keys it names (see transformers' TrainingArguments documentation)",
                )
            )
    return out


def bf16_advice(t: TrainingConfig, shape: precision.Shape) -> tuple[bool, str]:
    """What training.bf16 comes to on this machine, in one line: auto's choice (the job's own probe of
    `shape`, run here) with both rates, and for true/false whether auto agrees. The bool: warn (a forced
    dtype auto would not pick). It judges the machine it runs on: the job decides again on its node."""
    auto = precision.decide("auto", shape, fp16=t.fp16)
    if t.bf16 == "auto":
        return False, f"training.bf16: auto -> {auto.dtype} on this node: {auto.reason} (a job decides on its own node)"
    setting = "true" if t.bf16 else "false"
    if t.bf16 == auto.bf16:
        return False, f"training.bf16: {setting}; auto would pick {auto.dtype} here too: {auto.reason}"
    return True, (
        f"training.bf16: {setting}, but auto would pick {auto.dtype} on this node: {auto.reason}. "
        "Fix: set training.bf16: auto (or remove it)"
    )


def log_bf16_advice(cfg: JobConfig, model_config: dict | None) -> None:
    """`hpcnlp check` of a training job: bf16_advice's line for its model and batch (a warning when a forced
    dtype is not what this node's probe picks)."""
    warn, line = bf16_advice(cfg.training, precision.job_shape(cfg, model_config))
    log.log(logging.WARNING if warn else logging.INFO, line)


@contextlib.contextmanager
def _environ_kept():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
