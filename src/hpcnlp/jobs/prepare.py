"""`hpcnlp prepare`: tokenize and pack a corpus into <prepared_root>/<fingerprint>/ (see data/pack.py).

Scale-out: run as a Slurm array (`sbatch --array=0-3 slurm/prepare.sbatch jobs/prepare.yaml`): each task
builds its share of the shards with data.num_proc processes; the last to finish writes the index.
`data_from: jobs/pretrain.yaml` prepares exactly what that pretrain config will read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Literal

from hpcnlp import checks
from hpcnlp.config import ConfigError, CorpusConfig, JobConfig, Problem, read_yaml
from hpcnlp.data.pack import corpus_split_problems
from hpcnlp.models import load_tokenizer
from hpcnlp.runtime import stack
from hpcnlp.spec import JobSpec, SlurmDefaults


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class PrepareConfig(JobConfig):
    """`hpcnlp prepare` alone: tokenize and pack a corpus for later pretraining runs.

    `data_from: jobs/pretrain.yaml` takes the data section, model/tokenizer and whole_word_masking of
    that pretrain config (read when the config is loaded), so the two never drift apart."""

    job: Literal["prepare"] = "prepare"
    output_dir: str = ""  # unused: prepared data goes to data.prepared_root
    data_from: str | None = None
    SETTING_FILES: ClassVar[tuple[str, ...]] = ("data_from",)
    model_name_or_path: str = "minilm-l6"
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    whole_word_masking: bool = False  # keep token offsets (as the pretrain config with it needs)
    data: CorpusConfig

    def problems(self) -> list[Problem]:
        return self.data.problems()


# What a prepare config takes from the pretrain config named by data_from.
FROM_PRETRAIN = ("data", "model_name_or_path", "tokenizer_name_or_path", "trust_remote_code", "whole_word_masking")


def with_data_from(raw: dict, source: str) -> dict:
    """The prepare config `raw` on top of data_from's data section, tokenizer and whole_word_masking.
    Keys set here win (e.g. data.num_proc=8 for this node); ones that change the prepared data (say
    data.max_seq_length) would make a result that pretrain config does not read."""
    other = read_yaml(raw["data_from"])
    if other.get("job") != "pretrain":
        raise ConfigError(
            source,
            [
                Problem(
                    key="data_from",
                    message=f"{raw['data_from']} is not a pretrain config",
                    fix="name the pretrain config whose data this prepares",
                )
            ],
        )
    base = {k: other[k] for k in FROM_PRETRAIN if k in other}
    data = {**(base.get("data") or {}), **(raw.get("data") or {})}
    return {**base, **raw, "data": data}


def check(cfg: PrepareConfig, pending: Iterable[str] = ()) -> list[Problem]:
    return (
        corpus_split_problems(cfg.data)
        + checks.model("model_name_or_path", cfg.model_name_or_path, pending)
        + checks.model("tokenizer_name_or_path", cfg.tokenizer_name_or_path, pending)
    )


def _tokenizer(cfg: PrepareConfig):
    return load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)


def prepared_dir(cfg: PrepareConfig) -> Path:
    from hpcnlp.data.pack import fingerprint

    return Path(cfg.data.prepared_root) / fingerprint(cfg.data, _tokenizer(cfg), cfg.whole_word_masking)


def array_task() -> tuple[int, int]:
    """(index, count) of this Slurm array task; (0, 1) outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    low = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT") or int(os.environ["SLURM_ARRAY_TASK_MAX"]) - low + 1)
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - low, count


def run(cfg: PrepareConfig) -> int:
    from hpcnlp.data.pack import prepare, summary

    task = array_task()
    result = prepare(cfg.data, _tokenizer(cfg), cfg.whole_word_masking, task=task)
    if result.stats is None:
        print(f"task {task[0]} of {task[1]}: its shards are in {result.path}/shards; the last task writes the index")
    else:
        print(f"{'reused' if result.reused else 'prepared'} {result.path}: {summary(result.stats)}")
    return 0


def is_complete(cfg: PrepareConfig) -> bool:
    if not stack.installed():  # its dir is named by the tokenizer's fingerprint; a re-run reuses finished data
        stack.skipped("whether prepare already ran (a re-run reuses its data)")
        return False
    return (prepared_dir(cfg) / "stats.json").is_file()  # written last by prepare


def summary_row(cfg: PrepareConfig) -> dict:
    path = prepared_dir(cfg)
    s = json.loads((path / "stats.json").read_text())
    return {"metric": f"{s['tokens']:,} tokens in {s['blocks']:,} blocks of {s['max_seq_length']}", "output": str(path)}


SPEC = JobSpec(
    name="prepare",
    order=10,
    help="tokenize and pack a corpus once (reused by later pretrain runs)",
    config=PrepareConfig,
    check=check,
    run=run,
    single_process=True,
    is_complete=is_complete,
    expand=lambda raw, source: with_data_from(raw, source) if raw.get("data_from") else raw,
    summary_row=summary_row,
    status_file=lambda cfg: None,  # no output_dir: prepared data is shared
    slurm=SlurmDefaults(
        time="00:30:00",
        cpus_per_task=4,
        note="per task; N tasks: sbatch --array=0-<N-1> (a rerun redoes only unfinished shards)",
    ),
)
