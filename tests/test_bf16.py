"""bf16 training on CPU (`training.bf16: true`: the Trainer's own autocast) for pretrain, finetune and distill,
one process and under torchrun; and what `hpcnlp check` says about bf16 on this machine's CPU.

Whether bf16 is *faster* is make bench's question (bench/results): here only that it runs, trains in bf16
(accelerate's mixed_precision) and keeps fp32 weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import SENTIMENT_DATA, prepare_corpus, run_cli, tiny_pretrain, torchrun, write_config

from hpcnlp.checks import bf16_advice
from hpcnlp.config import TrainingConfig

QUIET = {"eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "seed": 7, "bf16": True}
DATA = {**SENTIMENT_DATA, "max_eval_samples": 32}


def _finetune(tmp_path: Path, steps: int = 3) -> Path:
    return write_config(
        tmp_path / "finetune.yaml",
        {
            "job": "finetune",
            "task": "sequence-classification",
            "model_name_or_path": "minilm-l6",
            "output_dir": str(tmp_path / "teacher"),
            "data": DATA,
            "training": {**QUIET, "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-4},
        },
    )


def _distill(tmp_path: Path, teacher: Path, steps: int = 3) -> Path:
    return write_config(
        tmp_path / "distill.yaml",
        {
            "job": "distill",
            "teacher": str(teacher),
            "output_dir": str(tmp_path / "student"),
            "student_num_layers": 2,
            "data": DATA,
            "latency": {"batch_sizes": [8], "seq_length": 32, "repeats": 2, "warmup": 1},
            "training": {**QUIET, "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 2e-4},
        },
    )


def _trained_in_bf16(out: Path, world_size: int = 1) -> dict:
    from safetensors.torch import load_file

    m = json.loads((out / "metrics.json").read_text())
    assert m["mixed_precision"] == "bf16" and m["world_size"] == world_size
    assert m["train_loss"] is not None and math.isfinite(m["train_loss"])
    weights = load_file(out / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}  # autocast: fp32 master weights
    return m


def test_bf16_advice_follows_the_cpu():
    on, off = TrainingConfig(bf16=True), TrainingConfig(bf16=False)
    amx = {"avx512_bf16": True, "amx_bf16": True}
    avx512_only = {"avx512_bf16": True, "amx_bf16": False}
    neither = {"avx512_bf16": False, "amx_bf16": False}
    assert bf16_advice(on, amx, gpu=False) is None
    assert "off, but" in bf16_advice(off, amx, gpu=False) and "training.bf16: true" in bf16_advice(off, amx, gpu=False)
    assert "no AMX" in bf16_advice(on, avx512_only, gpu=False)
    assert "emulated" in bf16_advice(on, neither, gpu=False)
    assert bf16_advice(off, neither, gpu=False) is None and bf16_advice(off, avx512_only, gpu=False) is None
    assert bf16_advice(on, neither, gpu=True) is None  # GPUs do bf16; this is about CPUs


def test_check_warns_when_bf16_is_asked_without_bf16_units(tmp_path, monkeypatch, capsys):
    from hpcnlp import tasks

    monkeypatch.setattr(tasks, "cpu", lambda: {"model": "Test CPU", "flags": {"avx512_bf16": False, "amx_bf16": False}})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert run_cli("check", "--config", str(tiny_pretrain(tmp_path, bf16=True))) == 0  # a warning, not an error
    out = capsys.readouterr().out  # the CLI logs to stdout
    assert "WARNING hpcnlp.checks: training.bf16: on, but Test CPU has no bf16 instructions" in out
    assert "ok:" in out


@pytest.mark.slow
def test_pretrain_in_bf16(tmp_path):
    assert run_cli("pretrain", "--config", str(tiny_pretrain(tmp_path, bf16=True))) == 0
    _trained_in_bf16(tmp_path / "out")


@pytest.mark.slow
def test_finetune_then_distill_in_bf16(tmp_path):
    assert run_cli("finetune", "--config", str(_finetune(tmp_path))) == 0
    _trained_in_bf16(tmp_path / "teacher")
    assert run_cli("distill", "--config", str(_distill(tmp_path, tmp_path / "teacher"))) == 0
    _trained_in_bf16(tmp_path / "student")


@pytest.mark.slow
def test_bf16_under_torchrun(tmp_path):
    """pretrain, finetune and distill, each two CPU processes (gloo) in bf16; the ranks stay identical."""
    pretrain = tiny_pretrain(tmp_path, bf16=True)
    prepare_corpus(pretrain)
    for job, config, out in (
        ("pretrain", pretrain, "out"),
        ("finetune", _finetune(tmp_path, 2), "teacher"),
        ("distill", _distill(tmp_path, tmp_path / "teacher", 2), "student"),
    ):
        proc = torchrun([job, "--config", str(config)])
        assert proc.returncode == 0, job + ": " + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert _trained_in_bf16(tmp_path / out, world_size=2)["replicas_identical"] is True, job


def test_unset_bf16_is_off_on_cpus_and_on_with_a_bf16_gpu(tmp_path, monkeypatch):
    import torch

    from hpcnlp.train import harness

    assert TrainingConfig().bf16 is None
    assert harness.training_arguments(TrainingConfig(), str(tmp_path)).bf16 is False  # this CPU machine
    assert harness.training_arguments(TrainingConfig(bf16=True), str(tmp_path)).bf16 is True
    # A bf16 GPU stood in for by torch.cuda's two answers (CI has no GPU); the decision alone is tested.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert harness._bf16({"bf16": None}) is True
    assert harness._bf16({"bf16": None, "fp16": True}) is False
    assert harness._bf16({"bf16": False}) is False
