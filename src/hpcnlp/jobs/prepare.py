"""`hpcnlp prepare`: tokenize and pack a corpus into <prepared_root>/<fingerprint>/ (see data/pack.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from hpcnlp import checks
from hpcnlp.config import PrepareConfig, Problem
from hpcnlp.data.corpus import corpus_problems
from hpcnlp.models import load_tokenizer
from hpcnlp.spec import JobSpec, SlurmDefaults


def check(cfg: PrepareConfig, pending: Iterable[str] = ()) -> list[Problem]:
    return (corpus_problems(cfg.data) + checks.model("model_name_or_path", cfg.model_name_or_path, pending)
            + checks.model("tokenizer_name_or_path", cfg.tokenizer_name_or_path, pending))


def _tokenizer(cfg: PrepareConfig):
    return load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)


def prepared_dir(cfg: PrepareConfig) -> Path:
    from hpcnlp.data.pack import fingerprint

    return Path(cfg.data.prepared_root) / fingerprint(cfg.data, _tokenizer(cfg), with_offsets=False)


def run(cfg: PrepareConfig) -> int:
    from hpcnlp.data.pack import prepare, summary

    result = prepare(cfg.data, _tokenizer(cfg))
    print(f"{'reused' if result.reused else 'prepared'} {result.path}: {summary(result.stats)}")
    return 0


def is_complete(cfg: PrepareConfig) -> bool:
    return (prepared_dir(cfg) / "stats.json").is_file()  # written last by prepare


def summary_row(cfg: PrepareConfig) -> dict:
    path = prepared_dir(cfg)
    s = json.loads((path / "stats.json").read_text())
    return {"metric": f"{s['tokens']:,} tokens in {s['blocks']:,} blocks of {s['max_seq_length']}",
            "output": str(path)}


SPEC = JobSpec(name="prepare", help="tokenize and pack a corpus once (reused by later pretrain runs)",
               config=PrepareConfig, check=check, run=run, single_process=True, is_complete=is_complete,
               summary_row=summary_row, status_file=lambda cfg: None,  # no output_dir: prepared data is shared
               slurm=SlurmDefaults(time="00:30:00", cpus_per_task=4))
