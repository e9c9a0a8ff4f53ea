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

from hpcnlp.config import JobConfig, Problem, TrainingConfig, TrainingJobConfig
from hpcnlp.models import ALIASES, ModelNotFound, resolve_model_path
from hpcnlp.runtime import env, rundir, stack
from hpcnlp.runtime.checkpoints import problem
from hpcnlp.runtime.io import is_inside
from hpcnlp.train import precision

log = logging.getLogger(__name__)


def model(key: str, value: str | None, pending: Iterable[str]) -> list[Problem]:
    if value is None or is_inside(value, pending):
        return []
    if value in ALIASES and not stack.installed():  # the model packages come with the training stack
        stack.skipped(f"{key}: the packaged model '{value}'")
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
    if value in ("never", "auto", "continue"):
        return []
    why = problem(Path(value), rundir.run_hash(cfg.model_dump(mode="json"))) if Path(value).is_dir() else "no such dir"
    if why is None:
        return []
    return [
        Problem(
            key="resume",
            message=f"'{value}' is not a complete checkpoint of this run: {why}",
            fix="use resume: auto (the newest complete checkpoint in output_dir; continue: the same after a "
            "finished run, to train it on to a higher max_steps); to start from other "
            "weights, set model_name_or_path to them",
        )
    ]


def output_dir(cfg: JobConfig, resume_: str = "never", finished: str = "metrics.json") -> list[Problem]:
    """Only this job's own runs are continued or replaced; nothing else is written into or removed.
    A training run asks rundir.verdict, as the job itself does when it starts (a requeued start too)."""
    if isinstance(cfg, TrainingJobConfig):
        max_steps = cfg.training.max_steps
        try:
            rundir.verdict(
                cfg.output_dir,
                rundir.run_hash(cfg.model_dump(mode="json")),
                cfg.overwrite,
                cfg.resume,
                env.slurm_restart_count() > 0,
                max_steps,
            )
        except rundir.OutputDirRefused as e:
            return [Problem(key="output_dir", message=str(e), fix=e.fix)]
        return []
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return (
            []
            if not out.exists()
            else [Problem(key="output_dir", message=f"'{out}' is a file", fix="choose a directory path")]
        )
    if not any(p.name not in rundir.OWN_FILES for p in out.iterdir()):
        return []
    hpcnlp_wrote = any((out / n).exists() for n in (rundir.RUN_FILE, finished)) or any(out.glob("checkpoint-*"))
    if not hpcnlp_wrote:
        return [
            Problem(
                key="output_dir",
                message=f"'{out}' holds files hpcnlp did not write",
                fix="choose another output_dir: no job writes into, or replaces, what it did not create",
            )
        ]
    if cfg.overwrite or not (out / finished).exists():
        return []
    return [
        Problem(
            key="output_dir",
            message=f"'{out}' holds a finished run ({finished})",
            fix="set overwrite: true, or choose a new output_dir",
        )
    ]


def overlaps(output: str, inputs: dict[str, str | None], key: str = "output_dir") -> list[Problem]:
    """An output dir that is, holds or lies in one of the job's inputs would be written over them."""
    out = []
    for name, value in inputs.items():
        if not value:
            continue
        try:
            model = name.endswith(("model_name_or_path", "teacher")) or name.startswith("teacher[")
            path = resolve_model_path(value) if model else value
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
    if not stack.installed():
        stack.skipped("training: TrainingArguments' fields and checks")
        return out
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
    if not stack.installed():  # a login node's thin install: the job probes on its node
        stack.skipped("training.bf16: auto's probe")
        return
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
