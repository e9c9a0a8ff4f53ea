"""`hpcnlp finetune` end to end: the real MiniLM on the shipped samples, a few CPU steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, write_config
from safetensors.torch import load_file

from hpcnlp.jobs import finetune, load_config
from hpcnlp.jobs.finetune import FreezeConfig

SENTIMENT = REPO / "data" / "classification" / "rotten-tomatoes"
WNUT = REPO / "data" / "ner" / "wnut16"
QUIET = {
    "warmup_ratio": 0.0,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 4,
    "seed": 7,
    "per_device_eval_batch_size": 32,
}


def config(tmp_path: Path, task: str, data: dict, training: dict, **top) -> Path:
    cfg = {
        "job": "finetune",
        "task": task,
        "model_name_or_path": "minilm-l6",
        "output_dir": str(tmp_path / "out"),
        "data": {"max_seq_length": 64, **data},
        "training": {**QUIET, **training},
        **top,
    }
    return write_config(tmp_path / "finetune.yaml", cfg)


def metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.slow
def test_sentiment_fits_its_training_sample_and_writes_everything(tmp_path):
    # Scored on the very rows it trained on: the model must beat the majority class (it can fit what it sees).
    train = str(SENTIMENT / "train.csv")
    path = config(
        tmp_path,
        "sequence-classification",
        {
            "train_file": train,
            "validation_file": train,
            "test_file": str(SENTIMENT / "test.csv"),
            "max_train_samples": 32,
            "max_eval_samples": 32,
        },
        {"max_steps": 16, "per_device_train_batch_size": 8, "learning_rate": 2e-4},
    )
    assert run_cli("finetune", "--config", str(path)) == 0
    m, out = metrics(tmp_path), tmp_path / "out"
    fit = m["eval"]["validation"]
    majority = max(s["support"] for s in fit["per_class"].values()) / fit["examples"]
    assert fit["accuracy"] >= majority + 0.2, (fit["accuracy"], majority)
    assert m["eval"]["test"]["examples"] == 32 and set(m["eval"]["test"]["per_class"]) == {"fresh", "rotten"}
    for name in (
        "model.safetensors",
        "report.md",
        "loss.png",
        "confusion_matrix.test.png",
        "confusion_matrix.test.json",
        "config.resolved.yaml",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["id2label"] == {"0": "fresh", "1": "rotten"} and config_json["label2id"]["rotten"] == 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and rows[0]["where"] == "row 1"
    assert set(rows[0]) >= {"text", "gold", "predicted", "score"} and 0.5 <= rows[0]["score"] <= 1
    correct = sum(r["gold"] == r["predicted"] for r in rows) / len(rows)
    assert correct == pytest.approx(m["eval"]["test"]["accuracy"])
    # the saved model reproduces the written predictions
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok = AutoModelForSequenceClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows[:4]], padding=True, return_tensors="pt")).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == [r["predicted"] for r in rows[:4]]


def _dense_sentences(tmp_path: Path, n: int) -> Path:
    """The first n shipped training tweets that hold an entity, as JSONL (the JSONL reader, real data)."""
    from hpcnlp.data.ner import read_conll

    sents = [s for s in read_conll(str(WNUT / "train.conll")) if any(t != "O" for t in s.tags)][:n]
    path = tmp_path / "dense.jsonl"
    path.write_text("".join(json.dumps({"tokens": s.tokens, "tags": s.tags}) + "\n" for s in sents))
    return path


@pytest.mark.slow
def test_ner_fits_its_training_sample(tmp_path):
    # Entities are ~10% of these words; weighting O down (0.3) lets them emerge in few steps (without
    # it the model still predicts all-O after 40 steps).
    dense = str(_dense_sentences(tmp_path, 16))
    path = config(
        tmp_path,
        "token-classification",
        {"train_file": dense, "validation_file": dense, "test_file": dense, "label_all_tokens": True},
        {"max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 2e-4},
        class_weights={"O": 0.3},
    )
    assert run_cli("finetune", "--config", str(path)) == 0
    m = metrics(tmp_path)
    fit = m["eval"]["validation"]
    all_o = 1 - sum(v["support"] for v in fit["per_type"].values()) / fit["words"]  # >= all-O accuracy
    assert fit["f1"] >= 0.6, fit  # the all-O baseline scores 0
    assert fit["token_accuracy"] > all_o
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["predicted"]) == len(r["tokens"]) == len(r["gold"]) for r in rows)


def test_bad_data_refuses_to_start_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    rows = (SENTIMENT / "validation.csv").read_text().splitlines()
    rows[5] = '"",fresh,some_movie'  # row 5 (after the header): empty text
    bad.write_text("\n".join(rows[:20]) + "\n")
    path = config(
        tmp_path,
        "sequence-classification",
        {"train_file": str(SENTIMENT / "train.csv"), "validation_file": str(bad)},
        {"max_steps": 1},
    )
    assert run_cli("finetune", "--config", str(path)) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: row 5: empty text in column 'text'. Fix:" in err
    assert not (tmp_path / "out").exists()


def test_config_problems(tmp_path, capsys):
    train = str(SENTIMENT / "train.csv")
    path = config(
        tmp_path,
        "sequence-classification",
        {"train_file": train, "text_column": "review"},
        {"eval_strategy": "steps", "save_strategy": "epoch"},
        freeze={"layers": 9},
        early_stopping_patience=2,
        class_weights={"fresh": 1.0, "spoiled": 2.0},
    )
    cfg_text = path.read_text().replace("max_seq_length: 64", "max_seq_length: 64\n  label_names: [fresh, rotten]")
    path.write_text(cfg_text)
    assert run_cli("check", "--config", str(path)) == 2
    err = capsys.readouterr().err
    for fragment in (
        "data.text_column: unknown column 'review'",
        "freeze.layers: the model has 6 layers",
        "training.save_strategy: load_best_model_at_end needs save_strategy == eval_strategy",
        "class_weights.spoiled: not in data.label_names",
    ):
        assert fragment in err, err
    assert run_cli("check", "--config", str(REPO / "jobs" / "finetune-sentiment.yaml")) == 0
    assert run_cli("check", "--config", str(REPO / "jobs" / "finetune-ner.yaml")) == 0


def test_freezing(minilm_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    trainable = lambda: {
        n.split(".")[1] if n.startswith("bert.") else n.split(".")[0]  # noqa: E731
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    info = finetune.freeze(model, FreezeConfig(embeddings=True, layers=4))
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert [any(p.requires_grad for p in layer.parameters()) for layer in model.bert.encoder.layer] == [False] * 4 + [
        True
    ] * 2
    assert trainable() == {"encoder", "pooler", "classifier"}
    assert info["trainable_parameters"] < info["total_parameters"]
    finetune.freeze(model, FreezeConfig(all_but_head=True))
    assert trainable() == {"classifier"}
    assert finetune.freeze(model, FreezeConfig(all_but_head=True))["trainable_parameters"] == 384 * 2 + 2


def test_class_weights():
    w = finetune.class_weight_vector("balanced", ["a", "b", "c"], [0, 0, 0, 1])
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 1.0])  # n / (k * count); c unseen keeps 1
    assert finetune.class_weight_vector({"b": 3.0}, ["a", "b"], [0]).tolist() == [1.0, 3.0]

    class Out:
        logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    labels = torch.tensor([0, 1, -100])
    loss = finetune.weighted_cross_entropy(torch.tensor([1.0, 3.0]))(Out, labels)
    per_row = torch.nn.functional.cross_entropy(Out.logits[:2], labels[:2], reduction="none")
    assert loss.item() == pytest.approx(((per_row * torch.tensor([1.0, 3.0])).sum() / 4).item())


@pytest.mark.slow
def test_pipeline_path_from_a_masked_lm_dir(tmp_path, minilm_path, minilm_tokenizer):
    """Start from a saved MiniLM *MLM* model (what `hpcnlp pretrain` writes), with frozen layers, class
    weights and an extra eval set reported apart."""
    from transformers import AutoModelForMaskedLM

    mlm = tmp_path / "mlm"
    AutoModelForMaskedLM.from_pretrained(minilm_path).save_pretrained(mlm)
    minilm_tokenizer.save_pretrained(mlm)
    path = config(
        tmp_path,
        "sequence-classification",
        {
            "train_file": str(SENTIMENT / "train.csv"),
            "validation_file": str(SENTIMENT / "validation.csv"),
            "extra_eval_files": {"test-as-ood": str(SENTIMENT / "test.csv")},
            "max_train_samples": 16,
            "max_eval_samples": 16,
        },
        {"max_steps": 2, "per_device_train_batch_size": 8},
        model_name_or_path=str(mlm),
        freeze={"embeddings": True, "layers": 4},
        class_weights="balanced",
    )
    assert run_cli("finetune", "--config", str(path)) == 0
    m = metrics(tmp_path)
    assert set(m["eval"]) == {"validation", "test-as-ood"} and m["eval"]["test-as-ood"]["examples"] == 16
    assert m["class_weights"][1] > 1 > m["class_weights"][0]  # rotten is the smaller class
    assert m["freeze"]["layers"] == 4 and m["freeze"]["trainable_parameters"] < m["freeze"]["total_parameters"] / 2
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert (tmp_path / "out" / "confusion_matrix.test-as-ood.png").is_file()


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # Only the head trains, at a tiny rate: accuracy on 16 rows cannot change, so the second
    # evaluation is no improvement and patience 1 stops the run there; the best is checkpoint-1.
    path = config(
        tmp_path,
        "sequence-classification",
        {
            "train_file": str(SENTIMENT / "train.csv"),
            "validation_file": str(SENTIMENT / "validation.csv"),
            "max_train_samples": 64,
            "max_eval_samples": 16,
        },
        {
            "max_steps": 10,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-5,
            "eval_strategy": "steps",
            "save_strategy": "steps",
            "eval_steps": 1,
            "save_steps": 1,
            "save_total_limit": 3,
            "metric_for_best_model": "accuracy",
        },
        freeze={"all_but_head": True},
        early_stopping_patience=1,
    )
    assert run_cli("finetune", "--config", str(path)) == 0
    m, out = metrics(tmp_path), tmp_path / "out"
    assert m["global_step"] == 2 and m["best_checkpoint"].endswith("checkpoint-1")
    final, best, last = (
        load_file(p / "model.safetensors")["classifier.weight"]
        for p in (out, out / "checkpoint-1", out / "checkpoint-2")
    )
    assert torch.equal(final, best) and not torch.equal(final, last)


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint(tmp_path):
    data = {
        "train_file": str(SENTIMENT / "train.csv"),
        "validation_file": str(SENTIMENT / "validation.csv"),
        "max_train_samples": 32,
        "max_eval_samples": 8,
    }
    training = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "save_strategy": "steps",
        "save_steps": 1,
        "load_best_model_at_end": False,
    }
    path = config(tmp_path, "sequence-classification", data, training, freeze={"all_but_head": True})
    assert run_cli("finetune", "--config", str(path)) == 0
    # A finished run is final: training on past its max_steps is asked for (resume: continue).
    assert run_cli("finetune", "--config", str(path), "resume=continue", "training.max_steps=4") == 0
    m = metrics(tmp_path)
    assert m["resumed_from"].endswith("checkpoint-2") and m["global_step"] == 4
    assert load_config(path, ["resume=auto"]).resume == "auto"
