"""Typed job configs: YAML files whose keys map one-to-one to these fields.

Every job config names its job (`job: pretrain`), so `hpcnlp check` can validate any of them.
Field names follow `transformers.TrainingArguments` wherever they mean the same thing.
Two layers of checking, both reported as one line per problem naming file, key and fix:
  1. shape: unknown keys (with "did you mean"), wrong types, out-of-range values (pydantic);
  2. meaning: files that must exist, output dirs holding finished runs, options that clash
     (`JobConfig.problems`).
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from hpcnlp.models import ModelNotFound, resolve_model_path


class Problem(BaseModel):
    key: str
    message: str
    fix: str = ""

    def line(self, source: str) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{source}: {self.key}: {self.message}.{fix}"


class ConfigError(Exception):
    """A config that must not run. `lines` holds one line per problem."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        self.lines = [p.line(source) for p in problems]
        super().__init__("\n".join(self.lines))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainingConfig(Section):
    """The subset of `TrainingArguments` a job may set; same names, same meaning."""

    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: str = "linear"
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(16, ge=1)
    per_device_eval_batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = "adamw_torch"
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = "steps"
    eval_steps: int | None = Field(None, ge=1)
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    group_by_length: bool = False
    deepspeed: str | None = None  # path to a DeepSpeed JSON (jobs/deepspeed/*.json)

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    def problems(self) -> list[Problem]:
        out = []
        if self.bf16 and self.fp16:
            out.append(Problem(key="training.bf16", message="bf16 and fp16 are both on",
                               fix="turn one of them off"))
        if self.deepspeed:
            path = Path(self.deepspeed)
            if not path.is_file():
                out.append(Problem(key="training.deepspeed", message=f"no such file '{path}'",
                                   fix="point it at a DeepSpeed JSON, e.g. jobs/deepspeed/zero2.json"))
            else:
                try:
                    json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    out.append(Problem(key="training.deepspeed", message=f"'{path}' is not valid JSON ({e})",
                                       fix="fix the JSON syntax"))
        return out

    def to_training_arguments(self, output_dir: str, **overrides: Any):
        from transformers import TrainingArguments

        import torch

        kwargs = self.model_dump()
        # Without use_cpu, accelerate finds no backend on a GPU-less machine: under torchrun every
        # rank then trains alone (no DDP, every rank "rank 0"). use_cpu makes it MULTI_CPU over gloo.
        kwargs["use_cpu"] = not torch.cuda.is_available()
        kwargs.update(overrides)
        return TrainingArguments(output_dir=output_dir, report_to="none", **kwargs)


class JobConfig(Section):
    """Fields every job has."""

    job: str
    output_dir: str
    overwrite: bool = False
    # Where the YAML came from (set by load_config), so errors at run time can name the file.
    _source: str = PrivateAttr("<config>")

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        """Meaning checks. `pending`: paths that earlier pipeline stages will create."""
        return []

    # --- helpers shared by the job configs -------------------------------------------------
    @staticmethod
    def _is_pending(path: str, pending: Iterable[str]) -> bool:
        p = os.path.abspath(path)
        return any(p == os.path.abspath(q) or p.startswith(os.path.abspath(q) + os.sep) for q in pending)

    def _model_problem(self, key: str, value: str | None, pending: Iterable[str]) -> list[Problem]:
        if value is None or self._is_pending(value, pending):
            return []
        try:
            resolve_model_path(value)
        except ModelNotFound as e:
            return [Problem(key=key, message=str(e), fix=e.fix)]
        return []

    def _output_dir_problem(self, resume: str = "never") -> list[Problem]:
        out = Path(self.output_dir)
        if self.overwrite or not out.exists():
            return []
        from hpcnlp.runtime.env import slurm_restart_count

        if slurm_restart_count() > 0:  # Slurm requeued this job: it resumes its own checkpoints
            return []
        if (out / "metrics.json").exists() and resume == "never":
            return [Problem(key="output_dir", message=f"'{out}' holds a finished run (metrics.json)",
                            fix="set overwrite: true, resume: auto, or choose a new output_dir")]
        if any(out.glob("checkpoint-*")) and resume == "never":
            return [Problem(key="output_dir", message=f"'{out}' holds checkpoints of an unfinished run",
                            fix="set resume: auto to continue it, or overwrite: true to start over")]
        return []


# ------------------------------------------------------------------------------------------
# Continued pretraining (masked LM) and corpus preparation
# ------------------------------------------------------------------------------------------
class CorpusConfig(Section):
    """Text to pretrain on, and how to tokenize and pack it (`hpcnlp prepare`)."""

    train_files: list[str] = Field(min_length=1)  # files, globs (** allowed) or directories
    eval_files: list[str] = Field(default_factory=list)  # held-out text; else split off by document
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL/Parquet column holding the text
    # What one document is in a plain-text file: a line, a blank-line separated paragraph, the file.
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    max_seq_length: int = Field(128, ge=8, le=8192)
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 42  # of the train/eval split by document
    num_proc: int = Field(1, ge=1)
    prepared_root: str = "outputs/prepared"  # prepared datasets live in <prepared_root>/<fingerprint>/

    def problems(self) -> list[Problem]:
        from hpcnlp.data.corpus import expand_files

        out = []
        for key in ("train_files", "eval_files"):
            for pattern in getattr(self, key):
                if not expand_files([pattern]):
                    out.append(Problem(key=f"data.{key}", message=f"'{pattern}' matches no file",
                                       fix="correct the path or glob (relative paths are from the working dir)"))
        if self.eval_fraction == 0 and not self.eval_files:
            out.append(Problem(key="data.eval_fraction", message="no held-out text: eval_fraction is 0 and "
                               "eval_files is empty", fix="set eval_fraction (e.g. 0.05) or give eval_files"))
        return out


class ScratchModelConfig(Section):
    """Size of a model trained from scratch (`init: scratch`), with a WordPiece vocab from the corpus."""

    vocab_size: int = Field(8000, ge=100)
    hidden_size: int = Field(256, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class PretrainConfig(JobConfig):
    job: Literal["pretrain"] = "pretrain"
    model_name_or_path: str = "minilm-l6"  # local dir or an installed-package alias
    tokenizer_name_or_path: str | None = None  # default: the model's own
    trust_remote_code: bool = False
    init: Literal["pretrained", "scratch"] = "pretrained"
    scratch: ScratchModelConfig = Field(default_factory=ScratchModelConfig)
    data: CorpusConfig
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_masking: bool = False
    # Run the MLM head only where a token is masked (~15% of positions); see train/mlm.py.
    sparse_mlm_head: bool = True
    resume: str = "never"  # never | auto (newest complete checkpoint) | a checkpoint dir
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        out = self.data.problems() + self.training.problems()
        if self.init == "pretrained":
            out += self._model_problem("model_name_or_path", self.model_name_or_path, pending)
        out += self._model_problem("tokenizer_name_or_path", self.tokenizer_name_or_path, pending)
        out += _resume_problems(self.resume)
        out += self._output_dir_problem(self.resume)
        if self.training.max_steps <= 0 and self.training.num_train_epochs <= 0:
            out.append(Problem(key="training.max_steps", message="nothing to train",
                               fix="set max_steps > 0 or num_train_epochs > 0"))
        return out


class PrepareConfig(JobConfig):
    """`hpcnlp prepare` alone: tokenize and pack a corpus for later pretraining runs."""

    job: Literal["prepare"] = "prepare"
    output_dir: str = ""  # unused: prepared data goes to data.prepared_root
    model_name_or_path: str = "minilm-l6"
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    data: CorpusConfig

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        return (self.data.problems() + self._model_problem("model_name_or_path", self.model_name_or_path, pending)
                + self._model_problem("tokenizer_name_or_path", self.tokenizer_name_or_path, pending))


def _resume_problems(resume: str) -> list[Problem]:
    if resume in ("never", "auto") or Path(resume).is_dir():
        return []
    return [Problem(key="resume", message=f"'{resume}' is neither never, auto nor a checkpoint dir",
                    fix="use resume: auto to pick the newest complete checkpoint in output_dir")]


# ------------------------------------------------------------------------------------------
# Fine-tuning: sequence classification and token classification (NER)
# ------------------------------------------------------------------------------------------
class FinetuneDataConfig(Section):
    """Labelled data. Classification: CSV/TSV/JSONL/Parquet; NER: CoNLL or JSONL with tokens+tags."""

    train_file: str
    validation_file: str | None = None  # else `validation_split` of train_file, stratified, by `seed`
    test_file: str | None = None  # predictions.jsonl is written for it
    extra_eval_files: dict[str, str] = Field(default_factory=dict)  # name -> file, each reported apart
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "conll"] = "auto"
    validation_split: float = Field(0.1, gt=0, lt=1)
    seed: int = 42  # of the train/validation split
    text_column: str = "text"  # sequence classification
    text_pair_column: str | None = None  # a second text (sentence pairs)
    label_column: str = "label"
    tokens_column: str = "tokens"  # token classification, JSONL
    tags_column: str = "tags"
    label_names: list[str] | None = None  # the label set; default: the labels seen in train_file
    max_seq_length: int = Field(128, ge=8, le=8192)
    label_all_tokens: bool = False  # NER: later sub-tokens get the I- tag instead of -100
    strict_iob2: bool = False  # NER: an I- tag after O is an error; seqeval scores in strict IOB2 mode
    max_train_samples: int | None = Field(None, ge=1)  # first N rows (quick runs)
    max_eval_samples: int | None = Field(None, ge=1)

    def files(self) -> dict[str, str]:
        named = {"train_file": self.train_file, "validation_file": self.validation_file,
                 "test_file": self.test_file}
        named.update({f"extra_eval_files.{k}": v for k, v in self.extra_eval_files.items()})
        return {k: v for k, v in named.items() if v}


class FreezeConfig(Section):
    """Which pretrained weights stay fixed; the task head always trains."""

    embeddings: bool = False
    layers: int = Field(0, ge=0)  # the first N encoder layers
    all_but_head: bool = False  # the whole encoder: only the classifier trains


class FinetuneTrainingConfig(TrainingConfig):
    """TrainingConfig with fine-tuning defaults: length-grouped batches, best checkpoint kept."""

    group_by_length: bool = True
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "f1"  # macro F1 (classification), entity F1 (NER); or accuracy, loss...
    greater_is_better: bool | None = None  # None: True unless the metric is a loss


class FinetuneConfig(JobConfig):
    job: Literal["finetune"] = "finetune"
    task: Literal["sequence-classification", "token-classification"]
    model_name_or_path: str = "minilm-l6"  # alias, local dir, or a `hpcnlp pretrain` output_dir
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    data: FinetuneDataConfig
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    class_weights: Literal["balanced"] | dict[str, float] | None = None  # loss weights per label
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    resume: str = "never"
    training: FinetuneTrainingConfig = Field(default_factory=FinetuneTrainingConfig)

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        from hpcnlp.data.labels import data_file_problems

        out = self.training.problems()
        out += self._model_problem("model_name_or_path", self.model_name_or_path, pending)
        out += self._model_problem("tokenizer_name_or_path", self.tokenizer_name_or_path, pending)
        out += data_file_problems(self.task, self.data, pending)
        out += self._freeze_problems(pending)
        out += self._best_model_problems()
        names = self.data.label_names
        if names is not None and len(set(names)) != len(names):
            out.append(Problem(key="data.label_names", message="a label is listed twice", fix="list each once"))
        if isinstance(self.class_weights, dict) and names is not None:
            for label in sorted(set(self.class_weights) - set(names)):
                out.append(Problem(key=f"class_weights.{label}", message="not in data.label_names",
                                   fix=f"use one of {names}"))
        out += _resume_problems(self.resume)
        out += self._output_dir_problem(self.resume)
        return out

    def _freeze_problems(self, pending: Iterable[str]) -> list[Problem]:
        if not self.freeze.layers or self._is_pending(self.model_name_or_path, pending):
            return []
        try:
            config = json.loads((Path(resolve_model_path(self.model_name_or_path)) / "config.json").read_text())
        except (ModelNotFound, OSError, json.JSONDecodeError):
            return []  # reported by the model check
        n = config.get("num_hidden_layers", config.get("n_layers"))
        if n is not None and self.freeze.layers > n:
            return [Problem(key="freeze.layers", message=f"the model has {n} layers, cannot freeze {self.freeze.layers}",
                            fix=f"use 0..{n} (or freeze.all_but_head: true)")]
        return []

    def _best_model_problems(self) -> list[Problem]:
        t, out = self.training, []
        if self.early_stopping_patience and (t.eval_strategy == "no" or not t.load_best_model_at_end):
            out.append(Problem(key="early_stopping_patience", message="early stopping needs evaluations and "
                               "training.load_best_model_at_end", fix="set training.eval_strategy to steps or "
                               "epoch and training.load_best_model_at_end: true, or drop early_stopping_patience"))
        if t.load_best_model_at_end:
            if t.eval_strategy != t.save_strategy:
                out.append(Problem(key="training.save_strategy", message=f"load_best_model_at_end needs "
                                   f"save_strategy == eval_strategy (got {t.save_strategy} and {t.eval_strategy})",
                                   fix="make them equal, or set training.load_best_model_at_end: false"))
            elif t.eval_strategy == "steps" and t.eval_steps and t.save_steps % t.eval_steps:
                out.append(Problem(key="training.save_steps", message=f"save_steps {t.save_steps} is not a "
                                   f"multiple of eval_steps {t.eval_steps}", fix="make it a multiple"))
        return out


# ------------------------------------------------------------------------------------------
# Post-processing: distill -> export (ONNX, quantize) -> validate (the gate) + bundle
# ------------------------------------------------------------------------------------------
POSTPROCESS_TASKS = ("sequence-classification", "token-classification")


def _model_task(path: str) -> str | None:
    """The task a saved model dir was trained for (from config.json architectures), None if unknown yet."""
    try:
        from hpcnlp.tasks import task_of

        return task_of(resolve_model_path(path))
    except (ModelNotFound, ValueError, OSError):
        return None


class LatencyConfig(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    seq_length: int = Field(128, ge=8)  # inputs padded to this length: comparable across runs
    repeats: int = Field(20, ge=1)
    warmup: int = Field(3, ge=0)
    num_threads: int | None = Field(None, ge=1)  # None: torch.get_num_threads() (OMP_NUM_THREADS)


class DistillConfig(JobConfig):
    """A smaller student learns from a fine-tuned teacher: alpha*T^2*KL(student/T || teacher/T) + (1-alpha)*CE."""

    job: Literal["distill"] = "distill"
    teacher: str  # a fine-tuned model dir (hpcnlp finetune output_dir)
    # Student: the teacher with `student_num_layers` of its layers kept evenly (every k-th, k = L / n,
    # DistilBERT-style), or a smaller local model with the same tokenizer.
    student_num_layers: int | None = Field(None, ge=1)
    student_model_name_or_path: str | None = None
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (teacher) loss
    trust_remote_code: bool = False
    data: FinetuneDataConfig
    latency: LatencyConfig = Field(default_factory=LatencyConfig)  # teacher vs student, same inputs
    resume: str = "never"
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        from hpcnlp.data.labels import data_file_problems

        out = self.training.problems() + _resume_problems(self.resume) + self._output_dir_problem(self.resume)
        out += self._model_problem("teacher", self.teacher, pending)
        out += self._model_problem("student_model_name_or_path", self.student_model_name_or_path, pending)
        if (self.student_num_layers is None) == (self.student_model_name_or_path is None):
            out.append(Problem(key="student_num_layers", message="give exactly one of student_num_layers and "
                               "student_model_name_or_path", fix="set the other to null"))
        task = _model_task(self.teacher)
        teacher_ready = not self._is_pending(self.teacher, pending) and not any(p.key == "teacher" for p in out)
        if teacher_ready and task not in POSTPROCESS_TASKS:
            out.append(Problem(key="teacher", message=f"'{self.teacher}' is not a sequence or token classifier",
                               fix="point it at a `hpcnlp finetune` output_dir"))
        if task in POSTPROCESS_TASKS:
            out += data_file_problems(task, self.data, pending)
        if task in POSTPROCESS_TASKS and self.student_num_layers:
            config = json.loads((Path(resolve_model_path(self.teacher)) / "config.json").read_text())
            n = config.get("num_hidden_layers")
            if n is None or n % self.student_num_layers or self.student_num_layers >= n:
                out.append(Problem(key="student_num_layers", message=f"cannot keep {self.student_num_layers} of "
                                   f"the teacher's {n} layers evenly",
                                   fix="use a divisor of the layer count smaller than it (e.g. 6 -> 3 or 2)"))
        return out


class QuantizeConfig(Section):
    """int8 quantization with onnxruntime (through Optimum's ORTQuantizer)."""

    mode: Literal["none", "dynamic", "static"] = "dynamic"
    preset: Literal["avx2", "avx512_vnni", "arm64"] = "avx2"  # the CPU the bundle will run on
    per_channel: bool = False
    calibration_samples: int = Field(128, ge=1)  # static: rows of data.train_file, shuffled by data.seed


class ExportConfig(JobConfig):
    """ONNX export with Optimum, optional ORT graph optimization and int8 quantization."""

    job: Literal["export"] = "export"
    model_name_or_path: str  # a fine-tuned (or distilled, or pretrained MLM) model dir
    trust_remote_code: bool = False
    opset: int = Field(17, ge=11, le=21)
    atol: float | None = Field(None, gt=0)  # Optimum's export check; None: its default for the architecture
    allow_tolerance_failure: bool = False  # Optimum only warns when atol is missed; we refuse unless this
    optimization_level: int = Field(0, ge=0, le=3)  # ORT graph optimization O1..O3 (0: none)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    data: FinetuneDataConfig | None = None  # static quantization calibrates on data.train_file

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        from hpcnlp.data.labels import data_file_problems

        out = self._output_dir_problem() + self._model_problem("model_name_or_path", self.model_name_or_path,
                                                               pending)
        if self.quantize.mode == "static":
            if self.data is None:
                out.append(Problem(key="data", message="static quantization needs calibration data",
                                   fix="add data.train_file (the training data), or use quantize.mode: dynamic"))
            else:
                task = _model_task(self.model_name_or_path)
                if task == "fill-mask":
                    out.append(Problem(key="quantize.mode", message="static quantization calibrates on labelled "
                                       "classification data; this is a masked LM", fix="use quantize.mode: dynamic"))
                out += data_file_problems(task, self.data, pending) if task in POSTPROCESS_TASKS else []
        return out


class ValidationThresholds(Section):
    fp32_atol: float = Field(1e-4, gt=0)  # max abs diff of every output, ONNX fp32 vs PyTorch
    fp32_min_argmax_agreement: float = Field(1.0, ge=0, le=1)
    int8_max_metric_drop: float = Field(0.01, ge=0)  # absolute: 0.01 = 1 point of accuracy / F1
    int8_min_argmax_agreement: float = Field(0.0, ge=0, le=1)  # off by default; the metric drop is the gate


class ValidateConfig(JobConfig):
    """The gate: ONNX vs PyTorch on real eval data; a passing model ships to <output_dir>/<name>/<version>/."""

    job: Literal["validate"] = "validate"
    output_dir: str = "artifacts"  # shipped bundles: <output_dir>/<name>/<version>/
    rejected_dir: str = "rejected"  # failing ones, with their report: <rejected_dir>/<name>/<version>/
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_name_or_path: str  # the PyTorch model that was exported (the reference)
    onnx_dir: str  # `hpcnlp export` output_dir: model.onnx (+ model.int8.onnx)
    data: FinetuneDataConfig  # eval set: validation_file (else finetune's split of train_file)
    num_examples: int = Field(64, ge=1)  # N eval examples for the per-output parity checks
    thresholds: ValidationThresholds = Field(default_factory=ValidationThresholds)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)

    def problems(self, pending: Iterable[str] = ()) -> list[Problem]:
        from hpcnlp.data.labels import data_file_problems

        out = self._model_problem("model_name_or_path", self.model_name_or_path, pending)
        if not self._is_pending(self.onnx_dir, pending) and not (Path(self.onnx_dir) / "model.onnx").is_file():
            out.append(Problem(key="onnx_dir", message=f"no model.onnx in '{self.onnx_dir}'",
                               fix="run `hpcnlp export` first and point onnx_dir at its output_dir"))
        task = _model_task(self.model_name_or_path)
        out += data_file_problems(task, self.data, pending) if task in POSTPROCESS_TASKS else []
        shipped = Path(self.output_dir) / self.name / self.version
        if shipped.exists() and not self.overwrite:
            out.append(Problem(key="version", message=f"'{shipped}' is already shipped",
                               fix="bump version (shipped bundles are immutable), or set overwrite: true"))
        return out


# Each job registers its config class here; `job:` in the YAML selects it.
JOB_CONFIGS: dict[str, type[JobConfig]] = {
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "validate": ValidateConfig,
}


# ------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> typed object, or ConfigError with one line per problem
# ------------------------------------------------------------------------------------------
def parse_overrides(overrides: Iterable[str], source: str = "<command line>") -> dict[str, Any]:
    """`a.b=1 c=[x,y]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, [Problem(key=item, message="override is not key=value",
                                               fix="write it as dotted.key=value, e.g. training.max_steps=10")])
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Names valid at a location, for 'did you mean'."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _shape_problems(cls: type[JobConfig], err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc), n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it (see the job's example in jobs/)"
            out.append(Problem(key=key, message="unknown key", fix=fix))
        elif e["type"] == "missing":
            out.append(Problem(key=key, message="required key is missing", fix="add it"))
        else:
            out.append(Problem(key=key, message=f"{e['msg']} (got {e.get('input')!r})",
                               fix="give a value of the right type/range"))
    return out


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), expect_job: str | None = None,
                pending: Iterable[str] = (), check_meaning: bool = True) -> JobConfig:
    """Read, override, validate. Raises ConfigError (all problems at once) before anything runs."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(source, [Problem(key="<file>", message="no such config file",
                                           fix="give a path to a YAML job config, e.g. jobs/pretrain.yaml")])
    except yaml.YAMLError as e:
        raise ConfigError(source, [Problem(key="<file>", message=f"not valid YAML ({e})".replace("\n", " "),
                                           fix="fix the YAML syntax")])
    if not isinstance(raw, dict):
        raise ConfigError(source, [Problem(key="<top>", message="a job config is a mapping of keys",
                                           fix="see jobs/*.yaml for examples")])
    raw = _merge(raw, parse_overrides(overrides))
    job = raw.get("job", expect_job)
    if job not in JOB_CONFIGS:
        close = difflib.get_close_matches(str(job), list(JOB_CONFIGS), n=1)
        raise ConfigError(source, [Problem(key="job", message=f"unknown job {job!r}",
                                           fix=f"did you mean '{close[0]}'?" if close
                                           else f"set job: to one of {sorted(JOB_CONFIGS)}")])
    if expect_job and job != expect_job:
        raise ConfigError(source, [Problem(key="job", message=f"this is a '{job}' config, not '{expect_job}'",
                                           fix=f"run `hpcnlp {job}` or pass a {expect_job} config")])
    raw["job"] = job
    cls = JOB_CONFIGS[job]
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, _shape_problems(cls, e)) from None
    cfg._source = source
    if check_meaning:
        problems = cfg.problems(pending)
        if problems:
            raise ConfigError(source, problems)
    return cfg


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

