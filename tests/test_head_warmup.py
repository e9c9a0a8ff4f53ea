"""Head warm-up: a checkpoint without an MLM head trains the head alone first, then everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, preempt_at, prepare_corpus, write_config
from safetensors.torch import load_file

from hpcnlp.cli import main
from hpcnlp.runtime import preempt

WARMUP = 3


@pytest.fixture(scope="module")
def headless(tmp_path_factory, minilm_tokenizer) -> Path:
    """A 1-layer BERT saved as a bare BertModel: like the packaged MiniLM, no MLM head in the checkpoint."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("headless") / "model"
    BertModel(
        BertConfig(
            vocab_size=len(minilm_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


def _config(tmp_path: Path, model: Path, **top) -> Path:
    return write_config(
        tmp_path / "warmup.yaml",
        {
            "job": "pretrain",
            "model_name_or_path": str(model),
            "output_dir": str(tmp_path / "out"),
            "head_warmup_steps": WARMUP,
            "head_learning_rate": 3e-3,
            **top,
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
                "save_steps": WARMUP,
                "save_total_limit": None,
                "seed": 11,
                "bf16": False,  # runs compared: one dtype, not training.bf16: auto's pick
            },
        },
    )


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def warmed(tmp_path_factory, headless):
    tmp = tmp_path_factory.mktemp("warmed")
    config = _config(tmp, headless)
    assert main(["pretrain", "--config", str(config)]) == 0
    return tmp, config


@pytest.mark.slow
def test_encoder_frozen_during_warmup_then_trains(warmed, headless):
    tmp, _ = warmed
    start = load_file(str(headless / "model.safetensors"))
    at_boundary = load_file(str(tmp / "out" / f"checkpoint-{WARMUP}" / "model.safetensors"))
    end = load_file(str(tmp / "out" / "checkpoint-6" / "model.safetensors"))
    encoder = [k for k in at_boundary if k.startswith("bert.") and k.removeprefix("bert.") in start]
    assert "bert.embeddings.word_embeddings.weight" in encoder  # the tied decoder weight waits too
    for k in encoder:
        assert torch.equal(at_boundary[k], start[k.removeprefix("bert.")]), k
    head = [k for k in at_boundary if k.startswith("cls.predictions.transform.")]
    assert head
    initial_head = _initial_head(headless)
    assert any(not torch.equal(at_boundary[k], initial_head[k]) for k in head), "the head did not move"
    moved = [k for k in encoder if not torch.equal(end[k], at_boundary[k])]
    assert "bert.embeddings.word_embeddings.weight" in moved and len(moved) > len(encoder) // 2
    m = json.loads((tmp / "out" / "metrics.json").read_text())
    assert m["mlm_head_new"] is True and m["head_warmup_steps"] == WARMUP and m["head_learning_rate"] == 3e-3


def _initial_head(headless: Path) -> dict[str, torch.Tensor]:
    """The head the job starts from: the same seed before the model is built, as the job does."""
    from transformers import AutoModelForMaskedLM, set_seed

    set_seed(11)
    model = AutoModelForMaskedLM.from_pretrained(headless)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_across_the_warmup_boundary_matches(warmed, monkeypatch):
    tmp, config = warmed
    out = tmp / "preempted"
    preempt_at(monkeypatch, WARMUP - 1)
    args = ["pretrain", "--config", str(config), f"output_dir={out}"]
    assert main(args) == preempt.REQUEUE_EXIT
    assert main([*args, "resume=auto"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(f"checkpoint-{WARMUP - 1}")
    a, b = _losses(tmp / "out"), _losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert b == pytest.approx(a, abs=1e-4)


def test_check_refuses_warmup_as_long_as_training(tmp_path, headless, capsys):
    config = _config(tmp_path, headless, head_warmup_steps=6)
    assert main(["check", "--config", str(config)]) != 0
    err = capsys.readouterr()
    text = err.out + err.err
    assert "head_warmup_steps" in text and "max_steps" in text


@pytest.mark.slow
def test_new_head_without_warmup_warns(tmp_path, headless, capsys):
    config = _config(tmp_path, headless, head_warmup_steps=0)
    assert main(["pretrain", "--config", str(config), "training.max_steps=1", "training.save_steps=1"]) == 0
    assert "no trained MLM head" in capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["mlm_head_new"] is True and m["head_warmup_steps"] == 0


@pytest.mark.slow
def test_downstream_report_compares_base_and_adapted(tmp_path, headless):
    from helpers import SENTIMENT_DATA

    finetune = write_config(
        tmp_path / "ft.yaml",
        {
            "job": "finetune",
            "task": "sequence-classification",
            "output_dir": str(tmp_path / "unused"),
            "data": {**SENTIMENT_DATA, "max_train_samples": 32, "max_eval_samples": 32},
            "training": {
                "max_steps": 2,
                "per_device_train_batch_size": 16,
                "eval_strategy": "no",
                "save_strategy": "no",
                "load_best_model_at_end": False,
                "seed": 3,
            },
        },
    )
    config = _config(tmp_path, headless, downstream=str(finetune))
    prepare_corpus(config)  # `hpcnlp check` plans for the cluster profile's process group, which never tokenizes
    assert main(["check", "--config", str(config)]) == 0
    assert main(["pretrain", "--config", str(config), "training.max_steps=4"]) == 0
    d = json.loads((tmp_path / "out" / "metrics.json").read_text())["downstream"]
    assert d["metric"] == "f1" and set(d) >= {"base", "adapted", "validation_difference"}
    assert d["validation_difference"] == pytest.approx(d["adapted"]["validation"] - d["base"]["validation"])
    for name in ("base", "adapted"):
        assert (tmp_path / "out-downstream" / name / "metrics.json").is_file()
    assert "Downstream" in (tmp_path / "out" / "report.md").read_text()


def test_check_names_a_bad_downstream_config(tmp_path, headless, capsys):
    config = _config(tmp_path, headless, downstream=str(tmp_path / "missing.yaml"))
    assert main(["check", "--config", str(config)]) != 0
    captured = capsys.readouterr()
    assert "downstream: " in captured.out + captured.err and "missing.yaml" in captured.out + captured.err


@pytest.mark.slow
def test_torchrun_two_processes_warm_up_as_one(tmp_path, headless):
    """DDP: every parameter keeps its gradient during the warm-up, so the ranks stay one data-parallel run."""
    from helpers import torchrun

    config = _config(tmp_path, headless)
    prepare_corpus(config)
    proc = torchrun(["pretrain", "--config", str(config), "training.max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["replicas_identical"] is True
    start = load_file(str(headless / "model.safetensors"))
    boundary = load_file(str(tmp_path / "out" / f"checkpoint-{WARMUP}" / "model.safetensors"))
    assert torch.equal(
        boundary["bert.encoder.layer.0.output.dense.weight"], start["encoder.layer.0.output.dense.weight"]
    )
