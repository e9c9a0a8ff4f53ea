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
    if not stack.installed():
        stack.skipped("training: TrainingArguments' fields and checks, bf16 advice")
        return out
    advice = bf16_advice(t)
    if advice:
        log.warning("training.bf16: %s", advice)
    from transformers import TrainingArguments

    kwargs = {
        **t.model_dump(),
        "deepspeed": None,
        "bf16": bool(t.bf16),
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


def bf16_advice(t: TrainingConfig, flags: dict[str, bool] | None = None, gpu: bool | None = None) -> str | None:
    """Whether bf16 pays on this machine's CPU: a warning when it is asked where there are no bf16 matmul
    units (AMX), a hint when there are and it is off (unset is off on CPUs). None on a GPU machine (unset
    is on there when the GPU has bf16), or when nothing is to say.
    It judges the machine it runs on: submit from a node like the compute nodes."""
    import torch

    from hpcnlp.tasks import cpu

    if torch.cuda.is_available() if gpu is None else gpu:
        return None
    info = cpu() if flags is None else {"model": "this CPU", "flags": flags}
    flags, model_name = info["flags"], info["model"]
    amx = flags.get("amx_bf16", False)
    if t.bf16 and not amx:
        how = (
            "has avx512_bf16 but no AMX: bf16 matmuls run at about half the fp32 rate there (bench/results)"
            if flags.get("avx512_bf16")
            else "has no bf16 instructions: bf16 is emulated there"
        )
        return f"on, but {model_name} {how}, so training is slower than fp32; set training.bf16: false on such nodes"
    if not t.bf16 and amx:
        return (
            f"off, but {model_name} has AMX bf16 units (amx_bf16): training.bf16: true (the Trainer's bf16 "
            "autocast) trained 1.5-3x faster than fp32 on such a CPU"
        )
    return None


@contextlib.contextmanager
def _environ_kept():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
