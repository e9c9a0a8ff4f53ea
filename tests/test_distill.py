"""`hpcnlp distill`: student init (every k-th layer), the loss, and the job on real teachers and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import NER_DATA, SENTIMENT_DATA, run_cli, torchrun, write_config

from hpcnlp.jobs.distill import distillation_loss, soft_targets, student_from_teacher


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


def test_ensemble_teaches_its_mean_probabilities():
    torch.manual_seed(0)
    student, a, b = torch.randn(6, 3), torch.randn(6, 3), 3 * torch.randn(6, 3)
    labels = torch.randint(0, 3, (6,))
    mean = (torch.softmax(a / 2, -1) + torch.softmax(b / 2, -1)) / 2
    assert torch.allclose(soft_targets([a, b], 2.0).exp(), mean, atol=1e-6)
    assert torch.allclose(soft_targets(a, 2.0), torch.log_softmax(a / 2, -1))  # one teacher: as before
    # Two equal teachers teach what one does; two unequal ones teach neither's targets alone.
    one = distillation_loss(student, a, labels, 2.0, 0.5)
    assert torch.allclose(distillation_loss(student, [a, a], labels, 2.0, 0.5), one, atol=1e-6)
    both = distillation_loss(student, [a, b], labels, 2.0, 1.0)
    assert not torch.allclose(both, distillation_loss(student, a, labels, 2.0, 1.0))
    assert not torch.allclose(both, distillation_loss(student, b, labels, 2.0, 1.0))
    # A student whose probabilities at T are the ensemble's mean has zero KL.
    assert distillation_loss(mean.log() * 2, [a, b], labels, 2.0, 1.0) < 1e-5


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
def test_self_distill_from_an_ensemble(sentiment_teacher, tmp_path):
    """jobs/self-distill-sentiment.yaml's shape: the package as student, two teachers (here the sentiment teacher
    and a 3-layer copy of it), the best epoch by validation F1, the test split scored for both sides."""
    from transformers import AutoModelForSequenceClassification

    from hpcnlp.jobs.distill import student_from_teacher

    small = tmp_path / "small-teacher"
    student_from_teacher(AutoModelForSequenceClassification.from_pretrained(sentiment_teacher), 3).save_pretrained(
        small
    )
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (small / f).write_bytes((Path(sentiment_teacher) / f).read_bytes())
    test = Path(SENTIMENT_DATA["validation_file"]).with_name("test.csv")
    data = {**SENTIMENT_DATA, "test_file": str(test), "max_eval_samples": 64}
    cfg = _distill_config(tmp_path, [sentiment_teacher, str(small)], data, 6)
    items = ["student_num_layers=null", "student_model_name_or_path=minilm-l6", "training.eval_strategy=steps"]
    items += ["training.eval_steps=3", "training.save_strategy=steps", "training.save_steps=3"]
    items += ["training.load_best_model_at_end=true", "training.metric_for_best_model=f1"]
    assert run_cli("distill", "--config", str(cfg), *items) == 0
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert m["teachers"] == [sentiment_teacher, str(small)] and m["student"]["layers"] == 6
    assert m["teacher"]["parameters"] > m["student"]["parameters"]  # both teachers counted
    assert {"f1", "accuracy"} <= set(m["teacher"]["test_metrics"]) and "f1" in m["student"]["test_metrics"]
    state = json.loads((tmp_path / "student" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] and any("eval_f1" in h for h in state["log_history"])  # F1 picked it
    assert "2 teachers (ensemble)" in (tmp_path / "student" / "report.md").read_text()


def test_ensemble_teachers_must_agree(sentiment_teacher, ner_teacher, tmp_path):
    cfg = _distill_config(tmp_path, [sentiment_teacher, sentiment_teacher], SENTIMENT_DATA, 1)
    assert run_cli("check", "--config", str(cfg)) == 0
    assert run_cli("check", "--config", str(cfg), f"teacher=[{sentiment_teacher}, {ner_teacher}]") == 2
    assert run_cli("check", "--config", str(cfg), "teacher=[]") == 2
    assert run_cli("check", "--config", str(cfg), "teacher=[5]") == 2  # one line: not one per str | list member


def test_a_student_of_another_vocabulary_is_refused_at_check(sentiment_teacher, tmp_path, capsys):
    """build_student refuses it at run time, after the queue: check says it first."""
    from transformers import BertTokenizerFast

    other = tmp_path / "other-vocab"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "movie", "good"]))
    BertTokenizerFast(vocab_file=str(other / "vocab.txt")).save_pretrained(other)
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    cfg = _distill_config(tmp_path, sentiment_teacher, SENTIMENT_DATA, 1)
    items = ["student_num_layers=null", f"student_model_name_or_path={other}"]
    assert run_cli("check", "--config", str(cfg), *items) == 2
    assert "has another vocabulary than the teacher" in capsys.readouterr().err
    assert (
        run_cli("check", "--config", str(cfg), "student_num_layers=null", "student_model_name_or_path=minilm-l6") == 0
    )


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

    files = {"distill": "distill", "export": "export", "validate": "validate", "self-distill-sentiment": "distill"}
    for name, job in files.items():
        assert load_config(REPO / "jobs" / f"{name}.yaml", check=False).job == job
