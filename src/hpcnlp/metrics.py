"""Fine-tuning metrics, offline: scikit-learn for classification, seqeval for entities.

Both report the same headline names, so `metric_for_best_model: f1` means the same thing in either
task: macro F1 over classes, or micro F1 over entities (seqeval's overall score).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnlp.data.labels import IGNORE

HEADLINE = ("accuracy", "precision", "recall", "f1", "token_accuracy")


def classification_metrics(gold: list[int], pred: list[int], label_names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(label_names)))
    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(gold, pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "precision": float(mp),
        "recall": float(mr),
        "f1": float(mf),
        "examples": len(gold),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        # rows: gold label, columns: predicted label
        "confusion_matrix": {"labels": label_names, "matrix": confusion_matrix(gold, pred, labels=ids).tolist()},
    }


def ner_metrics(gold: list[list[str]], pred: list[list[str]], strict_iob2: bool = False) -> dict:
    """Entity-level P/R/F1 (overall = micro over entities) and per type; token accuracy over words."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    mode = {"mode": "strict", "scheme": IOB2} if strict_iob2 else {}
    report = classification_report(gold, pred, output_dict=True, zero_division=0, **mode)
    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {
        "precision": float(precision_score(gold, pred, zero_division=0, **mode)),
        "recall": float(recall_score(gold, pred, zero_division=0, **mode)),
        "f1": float(f1_score(gold, pred, zero_division=0, **mode)),
        "token_accuracy": correct / max(words, 1),
        "sentences": len(gold),
        "words": words,
        "per_type": {
            t: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for t, v in report.items()
            if not t.endswith(" avg")
        },
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def headline(metrics: dict) -> dict:
    """The scalars the Trainer logs and picks the best checkpoint by."""
    return {k: metrics[k] for k in HEADLINE if k in metrics}


def classification_compute_metrics(label_names: list[str]):
    def compute(eval_pred):
        logits, labels = eval_pred
        return headline(classification_metrics(list(labels), list(np.argmax(logits, -1)), label_names))

    return compute


def word_tags(logits_or_ids, labels, label_names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tags at labelled positions (first sub-tokens of words in eval sets)."""
    preds = np.argmax(logits_or_ids, -1) if logits_or_ids.ndim == 3 else logits_or_ids
    gold, pred = [], []
    for p_row, l_row in zip(preds, labels):
        keep = l_row != IGNORE
        gold.append([label_names[i] for i in l_row[keep]])
        pred.append([label_names[i] for i in p_row[keep]])
    return gold, pred


def ner_compute_metrics(label_names: list[str], strict_iob2: bool):
    def compute(eval_pred):
        logits, labels = eval_pred
        return headline(ner_metrics(*word_tags(logits, labels, label_names), strict_iob2))

    return compute


def plot_confusion_matrix(confusion: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcnlp.report import save_figure

    labels, m = confusion["labels"], np.array(confusion["matrix"])
    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)
