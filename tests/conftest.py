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


# --- post-processing (distill, export, validate, bundle): small real teachers, shared per session ---
SENTIMENT = REPO / "data" / "classification" / "rotten-tomatoes"
WNUT = REPO / "data" / "ner" / "wnut16"
SENTIMENT_DATA = {"train_file": str(SENTIMENT / "train.csv"), "validation_file": str(SENTIMENT / "validation.csv"),
                  "max_seq_length": 48, "max_eval_samples": 400}
NER_DATA = {"train_file": str(WNUT / "train.conll"), "validation_file": str(WNUT / "validation.conll"),
            "max_seq_length": 48, "max_eval_samples": 64}


def train_teacher(out: Path, task: str, data: dict, steps: int, learning_rate: float) -> str:
    """MiniLM fine-tuned a few steps with a plain Trainer (not `hpcnlp finetune`: these tests are about
    what comes after it); saved with save_pretrained like a finetune output_dir."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hpcnlp.config import FinetuneDataConfig
    from hpcnlp.data import classification, ner
    from hpcnlp.models import load_tokenizer, resolve_model_path
    from hpcnlp.tasks import auto_model_class

    tokenizer = load_tokenizer("minilm-l6")
    loaded = (ner if task == "token-classification" else classification).load(FinetuneDataConfig(**data), tokenizer)
    names = loaded.label_names
    model = auto_model_class(task).from_pretrained(resolve_model_path("minilm-l6"), num_labels=len(names),
                                                   id2label=dict(enumerate(names)),
                                                   label2id={n: i for i, n in enumerate(names)})
    # Embeddings and the first 3 layers frozen: a third of the CPU time, and it still learns.
    for module in (model.bert.embeddings, *model.bert.encoder.layer[:3]):
        module.requires_grad_(False)
    collator = (DataCollatorForTokenClassification(tokenizer) if task == "token-classification"
                else DataCollatorWithPadding(tokenizer))
    args = TrainingArguments(str(out / "run"), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=learning_rate, seed=7, report_to="none", save_strategy="no",
                             logging_steps=steps, disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=loaded.splits["train"], data_collator=collator).train()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def sentiment_teacher(tmp_path_factory) -> str:
    return train_teacher(tmp_path_factory.mktemp("sentiment-teacher"), "sequence-classification",
                         SENTIMENT_DATA, steps=30, learning_rate=5e-4)


@pytest.fixture(scope="session")
def ner_teacher(tmp_path_factory) -> str:
    return train_teacher(tmp_path_factory.mktemp("ner-teacher"), "token-classification", NER_DATA, steps=20,
                         learning_rate=1e-3)


def run_cli(*argv: str) -> int:
    from hpcnlp.cli import main

    return main(list(argv))


def export_config(tmp: Path, model: str, **extra) -> Path:
    cfg = {"job": "export", "model_name_or_path": model, "output_dir": str(tmp / "onnx"),
           "quantize": {"mode": "dynamic", "preset": "avx2"}, **extra}
    return write_config(tmp / "export.yaml", cfg)


def validate_config(tmp: Path, model: str, onnx_dir: str, data: dict, **extra) -> Path:
    """Small latency runs: the gate's logic is under test here, not the timings."""
    cfg = {"job": "validate", "name": "test-model", "version": "1", "model_name_or_path": model,
           "onnx_dir": onnx_dir, "output_dir": str(tmp / "artifacts"), "rejected_dir": str(tmp / "rejected"),
           "data": data, "num_examples": 32,
           "latency": {"batch_sizes": [1, 8], "seq_length": 32, "repeats": 2, "warmup": 1}, **extra}
    return write_config(tmp / "validate.yaml", cfg)


@pytest.fixture(scope="session")
def sentiment_onnx(sentiment_teacher, tmp_path_factory) -> str:
    """The sentiment teacher exported by `hpcnlp export` (fp32 + dynamic int8)."""
    tmp = tmp_path_factory.mktemp("sentiment-export")
    assert run_cli("export", "--config", str(export_config(tmp, sentiment_teacher))) == 0
    return str(tmp / "onnx")


@pytest.fixture(scope="session")
def sentiment_bundle(sentiment_teacher, sentiment_onnx, tmp_path_factory) -> Path:
    """The sentiment model through `hpcnlp validate`: a shipped bundle (or the test fails here)."""
    tmp = tmp_path_factory.mktemp("sentiment-validate")
    assert run_cli("validate", "--config", str(validate_config(tmp, sentiment_teacher, sentiment_onnx,
                                                               SENTIMENT_DATA))) == 0
    return tmp / "artifacts" / "test-model" / "1"
