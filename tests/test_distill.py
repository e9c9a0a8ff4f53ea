"""`hpcnlp distill`: student init (every k-th layer), the loss, and the job on real teachers and data."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import NER_DATA, SENTIMENT_DATA, run_cli, torchrun, write_config

from hpcnlp.jobs.distill import distillation_loss, student_from_teacher


def test_student_keeps_every_kth_layer_and_the_head(minilm_path):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    student = student_from_teacher(teacher, 3)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert teacher.config.num_hidden_layers == 6 and len(teacher.bert.encoder.layer) == 6  # teacher untouched
    for s, t in zip(student.bert.encoder.layer, [teacher.bert.encoder.layer[i] for i in (1, 3, 5)]):
        assert torch.equal(s.output.dense.weight, t.output.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_distillation_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    labels = torch.randint(0, 3, (4, 5))
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, 3), labels.reshape(-1))
    assert torch.allclose(distillation_loss(student, teacher, labels, 2.0, alpha=0.0), ce)
    # A student equal to its teacher has zero KL: only the gold-label part is left.
    assert torch.allclose(distillation_loss(student, student, labels, 2.0, alpha=0.5), 0.5 * ce)
    # Positions labelled -100 count for nothing, whatever their logits.
    masked = labels.clone()
    masked[:, 3:] = -100
    moved = student.clone()
    moved[:, 3:] += 100
    assert torch.allclose(
        distillation_loss(student, teacher, masked, 2.0, 0.7), distillation_loss(moved, teacher, masked, 2.0, 0.7)
    )
    # T^2 scaling: the soft part is comparable across temperatures (Hinton et al.), not shrunk by 1/T^2.
    soft = distillation_loss(student, teacher, labels, 4.0, alpha=1.0)
    assert 0.1 < soft / distillation_loss(student, teacher, labels, 1.0, alpha=1.0) < 10


def _distill_config(tmp_path, teacher, data, steps):
    return write_config(
        tmp_path / "distill.yaml",
        {
            "job": "distill",
            "teacher": teacher,
            "output_dir": str(tmp_path / "student"),
            "student_num_layers": 3,
            "temperature": 2.0,
            "alpha": 0.5,
            "data": data,
            "latency": {"batch_sizes": [8], "seq_length": 48, "repeats": 3, "warmup": 1},
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": 16,
                "learning_rate": 2e-4,
                "eval_strategy": "no",
                "save_strategy": "no",
                "logging_steps": 5,
                "seed": 7,
            },
        },
    )


@pytest.mark.slow
def test_distill_sequence_classifier(sentiment_teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = {**SENTIMENT_DATA, "max_eval_samples": 128}
    assert run_cli("distill", "--config", str(_distill_config(tmp_path, sentiment_teacher, data, 12))) == 0
    out = tmp_path / "student"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "accuracy" and m["student"]["layers"] == 3 and m["teacher"]["layers"] == 6
    assert m["retention_pct"] == pytest.approx(
        100 * m["student"]["metrics"]["accuracy"] / m["teacher"]["metrics"]["accuracy"], abs=0.01
    )
    assert m["retention_pct"] > 80  # 20 steps recover most of what removing half the layers lost
    assert 0.7 < m["parameter_ratio"] < 0.8  # MiniLM: embeddings are a third of the weights
    assert list(m["speedup"]) == ["8"] and m["speedup"]["8"] > 0  # how much faster: make bench (noisy here)
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and student.config.id2label == {0: "fresh", 1: "rotten"}
    assert (out / "report.md").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_distill_token_classifier(ner_teacher, tmp_path):
    assert run_cli("distill", "--config", str(_distill_config(tmp_path, ner_teacher, NER_DATA, 4))) == 0
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert m["task"] == "token-classification" and m["metric"] == "f1"
    assert {"f1", "precision", "recall"} <= set(m["student"]["metrics"])


@pytest.mark.slow
def test_distill_under_torchrun_checks_that_ranks_agree(sentiment_teacher, tmp_path):
    """The shared Trainer harness: distill, like pretrain and finetune, compares the ranks' weights."""
    cfg = _distill_config(tmp_path, sentiment_teacher, {**SENTIMENT_DATA, "max_eval_samples": 32}, 4)
    proc = torchrun(["distill", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_step"] == 4 and m["replicas_identical"] is True


def test_distill_check_refuses_bad_layer_count(minilm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher = tmp_path / "teacher"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(teacher)
    cfg = _distill_config(tmp_path, str(teacher), SENTIMENT_DATA, 1)
    assert run_cli("check", "--config", str(cfg), "student_num_layers=4") == 2
    assert run_cli("check", "--config", str(cfg)) == 0
    assert not (tmp_path / "student").exists()


def test_shipped_job_configs_parse():
    """jobs/{distill,export,validate}.yaml: every key known and typed (their inputs come from earlier stages)."""
    from helpers import REPO

    from hpcnlp.jobs import load_config

    for job in ("distill", "export", "validate"):
        assert load_config(REPO / "jobs" / f"{job}.yaml", check=False).job == job
