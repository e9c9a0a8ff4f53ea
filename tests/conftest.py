"""Shared fixtures: the real packaged model, the shipped corpus, small real teachers, in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from fakeslurm import fake_slurm  # noqa: E402,F401  (the fixture: fake sbatch/squeue/scontrol on PATH)
from helpers import (  # noqa: E402
    CORPUS,
    NER_DATA,
    SENTIMENT,
    SENTIMENT_DATA,
    export_config,
    run_cli,
    train_teacher,
    validate_config,
    write_config,
)


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
    for name in (
        "tutorial/introduction.rst.txt",
        "tutorial/controlflow.rst.txt",
        "howto/sorting.rst.txt",
        "faq/general.rst.txt",
    ):
        (out / Path(name).name).write_bytes((CORPUS / name).read_bytes())
    return out


@pytest.fixture
def pretrain_config(tmp_path, small_corpus):
    """A tiny but real pretrain config (MiniLM, real text, a few steps). Returns (path, dict)."""
    cfg = {
        "job": "pretrain",
        "model_name_or_path": "minilm-l6",
        "output_dir": str(tmp_path / "out"),
        "data": {
            "train_files": [str(small_corpus / "*.rst.txt")],
            "max_seq_length": 64,
            "eval_fraction": 0.1,
            "prepared_root": str(tmp_path / "prepared"),
        },
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 32,
            "learning_rate": 3e-4,
            "logging_steps": 2,
            "eval_strategy": "no",
            "save_steps": 4,
            "seed": 7,
        },
    }
    return write_config(tmp_path / "pretrain.yaml", cfg), cfg


@pytest.fixture(scope="session")
def sentiment_teacher(tmp_path_factory) -> str:
    return train_teacher(
        tmp_path_factory.mktemp("sentiment-teacher"),
        "sequence-classification",
        SENTIMENT_DATA,
        steps=40,
        learning_rate=3e-4,
    )  # 0.70 accuracy, not the majority class


@pytest.fixture(scope="session")
def ner_teacher(tmp_path_factory) -> str:
    return train_teacher(
        tmp_path_factory.mktemp("ner-teacher"), "token-classification", NER_DATA, steps=20, learning_rate=1e-3
    )


@pytest.fixture(scope="session")
def sentiment_onnx(sentiment_teacher, tmp_path_factory) -> str:
    """The sentiment teacher exported by `hpcnlp export` (fp32 + dynamic int8)."""
    tmp = tmp_path_factory.mktemp("sentiment-export")
    assert run_cli("export", "--config", str(export_config(tmp, sentiment_teacher))) == 0
    return str(tmp / "onnx")


@pytest.fixture(scope="session")
def sentiment_bundle(sentiment_teacher, sentiment_onnx, tmp_path_factory) -> Path:
    """The sentiment model through `hpcnlp validate`: a shipped bundle (or the test fails here), with
    metrics on the held-out test file too."""
    tmp = tmp_path_factory.mktemp("sentiment-validate")
    data = {**SENTIMENT_DATA, "test_file": str(SENTIMENT / "test.csv")}
    assert run_cli("validate", "--config", str(validate_config(tmp, sentiment_teacher, sentiment_onnx, data))) == 0
    return tmp / "artifacts" / "test-model" / "1"
