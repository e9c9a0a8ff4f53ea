"""Token classification (NER): one BIO tag per word; entity F1 (seqeval), scored per word."""

from __future__ import annotations

from hpcnlp import metrics as m
from hpcnlp.data import ner
from hpcnlp.tasks.base import Task


def _collator(tokenizer):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer)  # pads labels with -100


def score(output, ds, label_names: list[str], data) -> tuple[dict, list[dict]]:
    """Word-level: each word's prediction is its first sub-token's; a word with no sub-token left
    (truncated) is predicted O, so it still counts against recall."""
    probs = m.softmax(output.predictions)
    gold, pred, rows = [], [], []
    for i, ex in enumerate(ds):
        first = {}
        for pos, w in enumerate(ex["word_ids"]):
            if w >= 0 and w not in first:
                first[w] = pos
        ids = [int(probs[i, first[w]].argmax()) if w in first else 0 for w in range(len(ex["tokens"]))]
        tags = [label_names[k] if w in first else "O" for w, k in enumerate(ids)]
        scores = [round(float(probs[i, first[w], k]), 4) if w in first else None for w, k in enumerate(ids)]
        gold.append(ex["tags"])
        pred.append(tags)
        rows.append(
            {
                "where": ex["where"],
                "text": " ".join(ex["tokens"]),
                "tokens": ex["tokens"],
                "gold": ex["tags"],
                "predicted": tags,
                "score": scores,
            }
        )
    return m.ner_metrics(gold, pred, data.strict_iob2), rows


def batch_metrics(logits: list, labels: list, names: list[str]) -> dict:
    gold, pred = [], []
    for lg, lab in zip(logits, labels):
        g, p = m.word_tags(lg, lab, names)
        gold += g
        pred += p
    return m.headline(m.ner_metrics(gold, pred))


TASK = Task(
    name="token-classification",
    architecture="ForTokenClassification",
    auto_model="AutoModelForTokenClassification",
    optimum_task="token-classification",
    primary_metric="f1",
    metric_names=("precision", "recall", "f1", "token_accuracy"),
    token_level=True,
    data_formats=("conll", "jsonl"),
    peft_task_type="TOKEN_CLS",
    reader=ner,
    data_columns=lambda d: {"tokens_column": d.tokens_column, "tags_column": d.tags_column},
    collator=_collator,
    compute_metrics=lambda names, data: m.ner_compute_metrics(names, data.strict_iob2),
    score=score,
    batch_metrics=batch_metrics,
    accuracy_key="token_accuracy",
    per_label_key="per_type",
    per_label_title="entity type",
    encode=lambda tok, text, pair, n: tok(text.split(), is_split_into_words=True, truncation=True, max_length=n),
    example_text="Jane Doe flew to Paris",
)
