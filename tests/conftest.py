"""Shared fixtures: the real packaged model, the shipped corpus, small job configs in tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "python-docs"


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from hpcnlp.models import resolve_model_path

    return resolve_model_path("minilm-l6")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from hpcnlp.models import load_tokenizer

    return load_tokenizer("minilm-l6")


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """Four real doc files (a few hundred KB) copied so tests may touch them."""
    out = tmp_path / "corpus"
    out.mkdir()
    for name in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt",
                 "howto/sorting.rst.txt", "faq/general.rst.txt"):
        (out / Path(name).name).write_bytes((CORPUS / name).read_bytes())
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def pretrain_config(tmp_path, small_corpus):
    """A tiny but real pretrain config (MiniLM, real text, a few steps). Returns (path, dict)."""
    cfg = {
        "job": "pretrain",
        "model_name_or_path": "minilm-l6",
        "output_dir": str(tmp_path / "out"),
        "data": {"train_files": [str(small_corpus / "*.rst.txt")], "max_seq_length": 64,
                 "eval_fraction": 0.1, "prepared_root": str(tmp_path / "prepared")},
        "training": {"max_steps": 8, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32,
                     "learning_rate": 3e-4, "logging_steps": 2, "eval_strategy": "no", "save_steps": 4,
                     "seed": 7},
    }
    return write_config(tmp_path / "pretrain.yaml", cfg), cfg
