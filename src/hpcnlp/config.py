"""The shared schema of job configs: what every job, or several jobs, have. Schema only.

Each job's own config class lives in its module (hpcnlp/jobs/<job>.py) and is built from these
sections; every job config names its job (`job: pretrain`) and the job registry (hpcnlp.jobs) picks
the class.
Field names follow `transformers.TrainingArguments` wherever they mean the same thing, and the
`training:` section *is* TrainingArguments: any of its fields, validated against its own types.
Two layers of checking, both reported as one line per problem naming file, key and fix:
  1. shape (here): unknown keys (with "did you mean"), wrong types, out-of-range or non-finite values,
     options that contradict each other (`problems()`, no file access);
  2. meaning (each job's `check`, hpcnlp.jobs): files that must exist, output dirs holding runs.
This module reads no files but the YAML it is given and imports nothing of data, tasks or models.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import difflib
import enum
import functools
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


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
    # allow_inf_nan=False: `learning_rate: .inf` is a typo, not a setting.
    # validate_default: a float field defaulting to 64 holds 64.0, as the frozen config reloads it (hashes agree)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, validate_default=True)


def _text_encoding(name: str) -> str:
    """A codec name Python decodes text with, refused here rather than when the first file is opened."""
    try:
        codecs.lookup(name)  # unknown name
        "".encode(name)  # known, but not a text encoding (base64, rot13); b"".decode skips empty input
    except LookupError:
        raise ValueError(
            f"{name!r} is not a text encoding Python knows; use a codec name such as utf-8, latin-1 or cp1252"
        ) from None
    return name


# The text encoding of data files: any Python codec name (utf-8, utf-8-sig, latin-1, cp1252, utf-16...).
TextEncoding = Annotated[str, AfterValidator(_text_encoding)]


# ------------------------------------------------------------------------------------------
# training: TrainingArguments as they are
# ------------------------------------------------------------------------------------------
# TrainingArguments fields a job sets itself; in `training:` they are refused with the key to use instead.
JOB_OWNED = {
    "output_dir": "set the top-level output_dir",
    "overwrite_output_dir": "set the top-level overwrite",
    "resume_from_checkpoint": "set the top-level resume (auto, never, continue or a checkpoint dir)",
    "do_train": "remove it: the job decides what it runs",
    "do_eval": "remove it: the job decides what it runs",
    "do_predict": "remove it: the job decides what it runs",
    "use_cpu": "remove it: the job uses the GPU when there is one",
    "no_cuda": "remove it",
    "include_num_input_tokens_seen": "remove it: the job counts tokens itself",
    "push_to_hub": "remove it: nothing is uploaded from a job",
    "hub_token": "remove it: no secrets in configs",
    "hub_model_id": "remove it: nothing is uploaded from a job",
}


@functools.cache
def training_arguments_fields() -> dict[str, Any]:
    """name -> type of every TrainingArguments field (imports transformers: only when a config needs it)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


class TrainingConfig(Section):
    """`transformers.TrainingArguments`: these fields carry hpcnlp's defaults and bounds; any other
    TrainingArguments field may be set too (`adam_beta2`, `report_to`, `ddp_timeout`, ...) and is
    validated against TrainingArguments' own type for it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(16, ge=1)
    per_device_eval_batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # auto: bf16 where the GPU has it; on a CPU where a probe at job start measures it faster (train/precision.py)
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = "steps"
    eval_steps: int | None = Field(None, ge=1)
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    report_to: str | list[str] = "none"  # e.g. [tensorboard]: event files in <output_dir>/runs, offline
    deepspeed: str | None = None  # path to a DeepSpeed JSON (jobs/deepspeed/*.json)

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_value(cls, v):
        # One name for "decided on the node": auto. null (the old unset) is refused rather than kept as a second name.
        if v is True or v is False or v == "auto":
            return v
        raise PydanticCustomError(
            "bf16_value",
            "must be true, false or auto",
            {"fix": "write auto (bf16 where it measures faster), or remove it"},
        )

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _training_arguments_fields(self):
        """Keys beyond the typed ones must be TrainingArguments fields of the right type."""
        if not self.model_extra:
            return self
        try:
            fields = training_arguments_fields()
        except ImportError:  # a login node's install (no transformers): checked at the job's start
            return self
        for key, value in list(self.model_extra.items()):
            if key in JOB_OWNED:
                raise PydanticCustomError("job_owned", "{key}: set by the job", {"key": key, "fix": JOB_OWNED[key]})
            if key not in fields:
                raise PydanticCustomError("unknown_training_key", "{key}: unknown key", {"key": key})
            try:
                checked = TypeAdapter(
                    fields[key], config=ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False)
                ).validate_python(value)
            except ValidationError as e:
                raise PydanticCustomError(
                    "training_value",
                    "{key}: {msg} (got {value!r})",
                    {"key": key, "msg": e.errors()[0]["msg"], "value": value},
                ) from None
            self.model_extra[key] = checked.value if isinstance(checked, enum.Enum) else checked
        return self

    def problems(self) -> list[Problem]:
        if self.bf16 is True and self.fp16:
            return [Problem(key="training.bf16", message="bf16 and fp16 are both on", fix="turn one of them off")]
        return []


# ------------------------------------------------------------------------------------------
# Fields every job has
# ------------------------------------------------------------------------------------------
class JobConfig(Section):
    job: str
    output_dir: str
    overwrite: bool = False
    # Where the YAML came from (set when loaded), so errors at run time can name the file.
    _source: str = PrivateAttr("<config>")
    # Dotted keys naming a file of settings the job reads: submit freezes a copy of each with the config
    # (hpcnlp.cluster.submit.snapshot), so editing it cannot change a queued job.
    SETTING_FILES: ClassVar[tuple[str, ...]] = ("training.deepspeed",)

    def problems(self) -> list[Problem]:
        """Contradictions within the config itself (no file access; files are the job's check)."""
        return []


class TrackingConfig(Section):
    """`tracking:` where `training.report_to: [mlflow]` and `[wandb]` keep a run (docs/tracking.md). Unset
    keys fall back to the job's environment (e.g. the cluster profile's `env:`), then to these defaults."""

    # MLflow experiment and W&B project. Default: $MLFLOW_EXPERIMENT_NAME / $WANDB_PROJECT, else "hpcnlp".
    experiment: str | None = None
    # Default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db (offline, beside the run).
    mlflow_tracking_uri: str | None = None
    # Default: $WANDB_MODE, else offline: compute nodes rarely reach the internet (`hpcnlp sync` uploads later).
    wandb_mode: Literal["offline", "online", "disabled"] | None = None


class TrainingJobConfig(JobConfig):
    """What the Trainer jobs (pretrain, finetune, distill) share: resuming, requeues, the step watchdog."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # never | auto (newest complete checkpoint of this run) | continue (auto, and a finished run trains on
    # to a raised training.max_steps) | a checkpoint dir
    resume: str = "never"
    max_requeues: int = Field(3, ge=0)  # preemptions a job may checkpoint and requeue itself after
    # A rank without a training step (or eval batch, or save) for this long fails the job, naming it.
    step_timeout_minutes: float | None = Field(15, gt=0)


# ------------------------------------------------------------------------------------------
# Adapters (LoRA through peft): finetune and pretrain train small low-rank updates, not the encoder
# ------------------------------------------------------------------------------------------
class AdapterConfig(Section):
    """LoRA (peft): `r`, `lora_alpha`, `lora_dropout`, `target_modules` mean what they mean in peft's
    LoraConfig. The task head always trains in full. The job writes the adapter alone to
    `<output_dir>/adapter/` and the merged model (a plain model, no adapter ops) to output_dir."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    # Module names (or dotted suffixes) inside each encoder layer; None: the architecture's default
    # (every linear layer of attention and FFN, hpcnlp.train.adapters.DEFAULT_TARGETS).
    target_modules: list[str] | None = Field(None, min_length=1)


# ------------------------------------------------------------------------------------------
# A corpus to pretrain on (prepare, pretrain)
# ------------------------------------------------------------------------------------------
class SourceConfig(Section):
    """One corpus source in `data.sources`: its files, and its share of the training blocks."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # names it in stats.json
    files: list[str] = Field(min_length=1)  # files, globs (** allowed) or directories
    exclude: list[str] = Field(default_factory=list)  # globs of files to leave out (matched on the path)
    weight: float = Field(1.0, gt=0)  # data.mix: weighted: its share of the training blocks (normalised)


class CorpusConfig(Section):
    """Text to pretrain on, and how to tokenize and pack it (`hpcnlp prepare`)."""

    # One source (train_files, exclude) or several (sources); text/JSONL/Parquet, also .gz .bz2 .xz .zst.
    train_files: list[str] = Field(default_factory=list)  # files, globs (** allowed) or directories
    exclude: list[str] = Field(default_factory=list)  # globs of train_files to leave out
    sources: list[SourceConfig] = Field(default_factory=list)
    # weighted: every source's blocks repeated or subsampled to its weight, shuffled together;
    # curriculum: all of the first source's blocks (shuffled), then the second's, ... in listed order.
    mix: Literal["weighted", "curriculum"] = "weighted"
    dedup: bool = (
        False  # drop exact repeats of a document (content hash) anywhere in the corpus; first copy kept, counted
    )
    eval_files: list[str] = Field(default_factory=list)  # held-out text; else split off by document
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL/Parquet column holding the text
    encoding: TextEncoding = "utf-8"  # of the text/JSONL files, any Python codec; undecodable bytes are counted
    # What one document is in a plain-text file: a line, a blank-line separated paragraph, the file.
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    max_seq_length: int = Field(128, ge=8, le=8192)
    eval_fraction: float = Field(0.05, ge=0, lt=1)  # share of documents held out (by content hash)
    seed: int = 42  # of the train/eval split and the order of the training blocks
    # Input per shard: a shard is the unit of work and of redoing after a failure; bigger files are
    # split by byte range at line/paragraph boundaries. Changing it changes the prepared data.
    shard_mb: float = Field(64, gt=0)
    num_proc: int = Field(1, ge=1)  # local prepare processes (a Slurm array adds its tasks on top)
    max_eval_blocks: int | None = Field(4096, ge=1)  # pretrain evaluates on at most this many eval blocks
    prepared_root: str = "outputs/prepared"  # prepared datasets live in <prepared_root>/<fingerprint>/

    def problems(self) -> list[Problem]:
        out = []
        if bool(self.train_files) == bool(self.sources):
            out.append(
                Problem(
                    key="data.train_files",
                    message="give either train_files (one source) or sources "
                    "(several), " + ("not both" if self.sources else "none is set"),
                    fix="e.g. train_files: [corpus/**/*.txt]",
                )
            )
        if self.sources and self.exclude:
            out.append(
                Problem(
                    key="data.exclude",
                    message="with sources, exclusions are per source",
                    fix="move it to data.sources[].exclude",
                )
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            out.append(
                Problem(
                    key="data.sources", message=f"source names repeat: {names}", fix="give every source its own name"
                )
            )
        if self.eval_fraction == 0 and not self.eval_files:
            out.append(
                Problem(
                    key="data.eval_fraction",
                    message="no held-out text: eval_fraction is 0 and eval_files is empty",
                    fix="set eval_fraction (e.g. 0.05) or give eval_files",
                )
            )
        return out

    def source_list(self) -> list[SourceConfig]:
        """data.sources, or train_files as one source named `train`."""
        return self.sources or [SourceConfig(name="train", files=self.train_files, exclude=self.exclude)]


# ------------------------------------------------------------------------------------------
# Labelled data: sequence classification and token classification (finetune, distill, prune, export, validate)
# ------------------------------------------------------------------------------------------
class FinetuneDataConfig(Section):
    """Labelled data. Classification: CSV/TSV/JSONL/Parquet; NER: CoNLL or JSONL with tokens+tags."""

    train_file: str
    validation_file: str | None = None  # else `validation_split` of train_file, stratified, by `seed`
    test_file: str | None = None  # predictions.jsonl is written for it
    extra_eval_files: dict[str, str] = Field(default_factory=dict)  # name -> file, each reported apart
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "conll"] = "auto"
    encoding: TextEncoding = "utf-8"  # of the CSV/TSV/JSONL/CoNLL files, any Python codec (Parquet is UTF-8)
    multiline_rows: bool = False  # CSV/TSV: a quoted field may hold line breaks (else a row is one line)
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
        named = {"train_file": self.train_file, "validation_file": self.validation_file, "test_file": self.test_file}
        named.update({f"extra_eval_files.{k}": v for k, v in self.extra_eval_files.items()})
        return {k: v for k, v in named.items() if v}


# ------------------------------------------------------------------------------------------
# Latency measurements (distill, prune, validate)
# ------------------------------------------------------------------------------------------
class LatencyConfig(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    seq_length: int = Field(128, ge=8)  # inputs padded to this length: comparable across runs
    repeats: int = Field(20, ge=1)
    warmup: int = Field(3, ge=0)
    num_threads: int | None = Field(None, ge=1)  # None: torch.get_num_threads() (OMP_NUM_THREADS)


# ------------------------------------------------------------------------------------------
# Reading: YAML + dotted overrides -> typed object, or ConfigError with one line per problem
# ------------------------------------------------------------------------------------------
MAX_YAML_NODES = 100_000  # values once every alias is expanded: configs have hundreds


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of the document with every alias expanded (an alias is the node it names: memoised, so a
    billion-laughs document is sized without being expanded). An alias inside what it names is refused."""
    if id(node) in memo:
        if memo[id(node)] < 0:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to itself", node.start_mark)
        return memo[id(node)]
    memo[id(node)] = -1  # on the path
    if isinstance(node, yaml.MappingNode):
        children = [x for pair in node.value for x in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(node)]


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently:
    `max_requeues: 0` lower down would win unseen) and a document whose aliases expand past
    MAX_YAML_NODES (a few nested aliases make gigabytes, and OmegaConf expands them)."""

    def construct_document(self, node):
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"expands to {size:,} values with its aliases (at most {MAX_YAML_NODES:,})", node.start_mark
            )
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merge keys (<<) and complex keys: SafeLoader's own rules
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"key {key!r} is given twice (first on line {seen[key] + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """YAML as hpcnlp reads every config: safe types only, keys unique, aliases bounded."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping, or a ConfigError naming the file."""
    source = str(path)
    try:
        raw = load_yaml(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(
            source,
            [
                Problem(
                    key="<file>",
                    message="no such config file",
                    fix="give a path to a YAML job config, e.g. jobs/pretrain.yaml",
                )
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            source, [Problem(key="<file>", message=f"cannot be read ({e})", fix="give a readable UTF-8 YAML file")]
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            source,
            [Problem(key="<file>", message=f"not valid YAML ({e})".replace("\n", " "), fix="fix the YAML syntax")],
        ) from None
    except RecursionError:
        raise ConfigError(
            source, [Problem(key="<file>", message="nested too deeply to read", fix="flatten the YAML")]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            source,
            [Problem(key="<top>", message="a job config is a mapping of keys", fix="see jobs/*.yaml for examples")],
        ) from None
    return raw


def with_overrides(raw: dict, overrides: Iterable[str], source: str = "<command line>") -> dict:
    """`a.b=1 c=[x,y]` merged into `raw` (OmegaConf's dotlist: values are YAML)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    if not overrides:
        return raw
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                source,
                [
                    Problem(
                        key=item,
                        message="override is not key=value",
                        fix="write it as dotted.key=value, e.g. training.max_steps=10",
                    )
                ],
            ) from None
    try:
        merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_container(merged)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as e:  # TypeError: a list over a mapping
        bad = next((o for o in overrides if not _parses(o) or not _merges(raw, o)), " ".join(overrides))
        raise ConfigError(
            source,
            [
                Problem(
                    key=bad,
                    message=f"cannot be read ({str(e).splitlines()[0]})",
                    fix="quote the value or fix its YAML, e.g. key='[x' or key=[a,b]"
                    if not _parses(bad)
                    else "give the key a value of its kind: a list for a list, a mapping for a mapping",
                )
            ],
        ) from None


def _merges(raw: dict, override: str) -> bool:
    from omegaconf import OmegaConf

    try:
        OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist([override]))
        return True
    except Exception:  # whatever OmegaConf raises for this one override: it is the one to name
        return False


def _parses(override: str) -> bool:
    try:
        yaml.safe_load(override.split("=", 1)[1])
        return True
    except yaml.YAMLError:
        return False


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Names valid at a location, for 'did you mean'."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    names = list(cls.model_fields)
    if issubclass(cls, TrainingConfig):
        with contextlib.suppress(ImportError):  # no transformers here: the typed keys only
            names += list(training_arguments_fields())
    return names


def shape_problems(cls: type[JobConfig], err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        ctx = e.get("ctx") or {}
        if e["type"] in ("unknown_training_key", "job_owned", "training_value"):
            loc, key = (*loc, ctx["key"]), f"{key}.{ctx['key']}"
        if e["type"] in ("extra_forbidden", "unknown_training_key"):
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc), n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it (see the job's example in jobs/)"
            out.append(Problem(key=key, message="unknown key", fix=fix))
        elif e["type"] == "job_owned":
            out.append(Problem(key=key, message="is set by the job, not in training:", fix=ctx["fix"]))
        elif e["type"] == "training_value":
            out.append(
                Problem(
                    key=key,
                    message=f"{ctx['msg']} (got {ctx['value']!r})",
                    fix="give a value of the type TrainingArguments takes",
                )
            )
        elif e["type"] == "missing":
            out.append(Problem(key=key, message="required key is missing", fix="add it"))
        else:
            out.append(
                Problem(
                    key=key,
                    message=f"{e['msg']} (got {e.get('input')!r})",
                    fix=ctx.get("fix", "give a value of the right type/range"),
                )
            )
    return out


def validate(cls: type[JobConfig], raw: dict, source: str) -> JobConfig:
    """The shape of one job's config (keys, types, ranges); ConfigError with every problem at once."""
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, shape_problems(cls, e)) from None
    cfg._source = source
    return cfg


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
