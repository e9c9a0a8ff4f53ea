"""Shared test helpers: paths to shipped data, small job configs, the CLI in-process, small real teachers.

Imported by name (`from helpers import ...`); the fixtures that use them are in conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "python-docs"
SENTIMENT = REPO / "data" / "classification" / "rotten-tomatoes"
WNUT = REPO / "data" / "ner" / "wnut16"


def tiny_bert_without_dropout(path: Path) -> Path:
    """A saved 1-layer BertForMaskedLM with the packaged vocab and no dropout (dropout draws from the global
    RNG, which a DDP run's evaluation before training moves): ZeRO and DDP runs from it see the same masks."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=30522,  # the packaged MiniLM's tokenizer
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForMaskedLM(config).save_pretrained(path)
    return path


def tiny_pretrain(tmp_path: Path, name: str = "tiny.yaml", **training) -> Path:
    """A 1-layer BERT from scratch with the packaged vocab on two doc files: seconds on one core."""
    return write_config(
        tmp_path / name,
        {
            "job": "pretrain",
            "init": "scratch",
            "tokenizer_name_or_path": "minilm-l6",
            "output_dir": str(tmp_path / "out"),
            "scratch": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
            "data": {
                "train_files": [
                    str(CORPUS / "tutorial" / "introduction.rst.txt"),
                    str(CORPUS / "tutorial" / "controlflow.rst.txt"),
                ],
                "max_seq_length": 32,
                "eval_fraction": 0.1,
                "prepared_root": str(tmp_path / "prepared"),
            },
            "training": {
                "max_steps": 6,
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "eval_strategy": "no",
                "save_steps": 3,
                "seed": 11,
                **training,
            },
        },
    )


def prepare_corpus(config: Path) -> None:
    """Prepare a pretrain config's corpus, as the pipeline's first stage does: a process group never tokenizes."""
    from hpcnlp.cli import main

    prepare = config.with_name(f"prepare-{config.name}")
    prepare.write_text(yaml.safe_dump({"job": "prepare", "data_from": str(config)}))
    assert main(["prepare", "--config", str(prepare)]) == 0


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it): tests never share a fixed rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every job process of a test sees: one thread (the machine is shared), nothing fetched from the hub.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def torchrun_command(args: list[str], nproc: int = 2, port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run` on this node, `nproc` processes of `hpcnlp <args>`, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port or free_port()),
        "-m",
        "hpcnlp",
        *args,
    ]


def torchrun_env(env: dict | None = None) -> dict:
    """The test's environment, one thread per process, offline, plus `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV, **(env or {})}


def torchrun(
    args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `hpcnlp <args>` under torchrun (see torchrun_command), output captured as text.

    proc = torchrun(["pretrain", "--config", str(config), "training.max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    """
    return subprocess.run(
        torchrun_command(args, nproc), env=torchrun_env(env), capture_output=True, text=True, timeout=timeout
    )


def preempt_at(monkeypatch, step: int) -> None:
    """Make the next training run ask for a checkpoint at `step`, as the Slurm signal path does (the flag
    file every rank polls): it saves checkpoint-<step> and exits 75."""
    from hpcnlp.runtime import preempt

    original = preempt.PreemptionCallback.on_step_end

    def flag(self, args, state, control, **kw):
        if state.global_step == step and not self.requested:
            Path(self.flag_file).touch()
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(preempt.PreemptionCallback, "on_step_end", flag)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# Small real fine-tuning data shipped in data/ (see data/README.md).
SENTIMENT_DATA = {
    "train_file": str(SENTIMENT / "train.csv"),
    "validation_file": str(SENTIMENT / "validation.csv"),
    "max_seq_length": 48,
    "max_eval_samples": 400,
}
NER_DATA = {
    "train_file": str(WNUT / "train.conll"),
    "validation_file": str(WNUT / "validation.conll"),
    "max_seq_length": 48,
    "max_eval_samples": 64,
}


def train_teacher(out: Path, task: str, data: dict, steps: int, learning_rate: float) -> str:
    """MiniLM fine-tuned a few steps with a plain Trainer (not `hpcnlp finetune`: these tests are about
    what comes after it); saved with save_pretrained like a finetune output_dir."""
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from hpcnlp.config import FinetuneDataConfig
    from hpcnlp.data import classification, ner
    from hpcnlp.models import load_tokenizer, resolve_model_path
    from hpcnlp.tasks import auto_model_class

    tokenizer = load_tokenizer("minilm-l6")
    loaded = (ner if task == "token-classification" else classification).load(FinetuneDataConfig(**data), tokenizer)
    names = loaded.label_names
    set_seed(7)  # the new head is drawn from the global RNG: unseeded, each run trained another teacher
    model = auto_model_class(task).from_pretrained(
        resolve_model_path("minilm-l6"),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    # Embeddings and the first 3 layers frozen: a third of the CPU time, and it still learns.
    for module in (model.bert.embeddings, *model.bert.encoder.layer[:3]):
        module.requires_grad_(False)
    collator = (
        DataCollatorForTokenClassification(tokenizer)
        if task == "token-classification"
        else DataCollatorWithPadding(tokenizer)
    )
    args = TrainingArguments(
        str(out / "run"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=learning_rate,
        seed=7,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=loaded.splits["train"], data_collator=collator).train()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def run_cli(*argv: str) -> int:
    from hpcnlp.cli import main

    return main(list(argv))


def cli(*argv: str, cwd: Path | str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`hpcnlp <argv>` in this process, as a subprocess would see it (its cwd, its environment on top of
    this one), with its exit code and output captured: the fast tier pays torch's import once, not per call."""
    import contextlib
    import io

    from hpcnlp.cli import main

    out, err, saved_env, saved_cwd = io.StringIO(), io.StringIO(), dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse's --help and usage errors, sbatch refusals
                code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["hpcnlp", *argv], code, out.getvalue(), err.getvalue())


def export_config(tmp: Path, model: str, **extra) -> Path:
    cfg = {
        "job": "export",
        "model_name_or_path": model,
        "output_dir": str(tmp / "onnx"),
        "quantize": {"mode": "dynamic", "preset": "avx2"},
        **extra,
    }
    return write_config(tmp / "export.yaml", cfg)


def validate_config(tmp: Path, model: str, onnx_dir: str, data: dict, **extra) -> Path:
    """Small latency runs: the gate's logic is under test here, not the timings."""
    cfg = {
        "job": "validate",
        "name": "test-model",
        "version": "1",
        "model_name_or_path": model,
        "onnx_dir": onnx_dir,
        "output_dir": str(tmp / "artifacts"),
        "rejected_dir": str(tmp / "rejected"),
        "data": data,
        "num_examples": 32,
        "latency": {"batch_sizes": [1, 8], "seq_length": 32, "repeats": 2, "warmup": 1},
        **extra,
    }
    return write_config(tmp / "validate.yaml", cfg)
