"""Sequence classification: one label per text (or text pair); macro F1 over classes."""

from __future__ import annotations

import numpy as np

from hpcnlp import metrics as m
from hpcnlp.data import classification
from hpcnlp.tasks.base import Task


def _collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def score(output, ds, label_names: list[str], data) -> tuple[dict, list[dict]]:
    """Metrics of a Trainer prediction run, and one row per example (gold, predicted, its probability)."""
    probs = m.softmax(output.predictions)
    pred = probs.argmax(-1)
    metrics = m.classification_metrics(list(ds["labels"]), list(pred), label_names)
    rows = []
    for i, ex in enumerate(ds):
        row = {"where": ex["where"], "text": ex["text"]}
        if "text_pair" in ex:
            row["text_pair"] = ex["text_pair"]
        rows.append(
            {
                **row,
                "gold": label_names[ex["labels"]],
                "predicted": label_names[pred[i]],
                "score": round(float(probs[i, pred[i]]), 4),
            }
        )
    return metrics, rows


def batch_metrics(logits: list, labels: list, names: list[str]) -> dict:
    pred = np.concatenate([lg.argmax(-1) for lg in logits])
    return m.headline(m.classification_metrics(np.concatenate(labels).tolist(), pred.tolist(), names))


TASK = Task(
    name="sequence-classification",
    architecture="ForSequenceClassification",
    auto_model="AutoModelForSequenceClassification",
    optimum_task="text-classification",
    primary_metric="accuracy",
    metric_names=("accuracy", "precision", "recall", "f1"),
    data_formats=("csv", "tsv", "jsonl", "parquet"),
    peft_task_type="SEQ_CLS",
    reader=classification,
    data_columns=lambda d: {
        "text_column": d.text_column,
        "label_column": d.label_column,
        "text_pair_column": d.text_pair_column,
    },
    collator=_collator,
    compute_metrics=lambda names, data: m.classification_compute_metrics(names),
    score=score,
    batch_metrics=batch_metrics,
    encode=lambda tok, text, pair, n: tok(text, pair, truncation=True, max_length=n),
    example_text="a text to classify",
)
