"""Helpers for the real-Slurm tests: tiny job configs and job logs."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus" / "python-docs"


def tiny_pretrain(tmp: Path, corpus: Path, prepared: Path, name: str = "out", prepare: bool = True, **training) -> Path:
    """A real pretrain config small enough for 2 shared cores: a 2-layer BERT from scratch with the
    packaged model's vocab (a WordPiece vocab trained here is not bit-for-bit repeatable across runs).
    `prepare`: its data prepared here first (a multi-node pretrain never tokenizes; it refuses)."""
    cfg = {
        "job": "pretrain",
        "init": "scratch",
        "tokenizer_name_or_path": "minilm-l6",
        "output_dir": str(tmp / name),
        "scratch": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "data": {
            "train_files": [str(corpus / "*.rst.txt")],
            "max_seq_length": 32,
            "eval_fraction": 0.05,
            "prepared_root": str(prepared),
        },
        "training": {
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 64,
            "learning_rate": 1e-3,
            "logging_steps": 2,
            "eval_strategy": "no",
            "save_steps": 4,
            "save_total_limit": None,
            "seed": 7,
            **training,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if prepare:
        from hpcnlp.config import CorpusConfig
        from hpcnlp.data.pack import prepare as prepare_corpus
        from hpcnlp.models import load_tokenizer

        prepare_corpus(CorpusConfig(**cfg["data"]), load_tokenizer(cfg["tokenizer_name_or_path"]))
    return path


def log_of(slurm, job_id: str) -> str:
    path = slurm.job(job_id).get("StdOut")
    return Path(path).read_text() if path and os.path.exists(path) else ""
