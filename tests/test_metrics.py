"""Fine-tuning metrics against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpcnlp.metrics import classification_metrics, ner_compute_metrics, ner_metrics, plot_confusion_matrix, word_tags


def test_classification_metrics_by_hand():
    names = ["neg", "neu", "pos"]
    gold = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 0]
    m = classification_metrics(gold, pred, names)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # neg: P 2/3 R 2/3; neu: P 1/2 R 1/2; pos: P 2/3 R 2/3
    assert m["per_class"]["neg"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["neu"]["f1"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    # rows are gold, columns predicted
    assert m["confusion_matrix"] == {"labels": names, "matrix": [[2, 1, 0], [0, 1, 1], [1, 0, 2]]}
    json.dumps(m)  # goes into metrics.json as it is


def test_class_never_predicted_scores_zero_not_nan():
    m = classification_metrics([0, 1, 1], [1, 1, 1], ["a", "b"])
    assert m["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_ner_metrics_entities_and_words():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "B-LOC"]]
    m = ner_metrics(gold, pred)
    # entities: gold PER, LOC, ORG; predicted PER, ORG, LOC(wrong place) -> 2 of 3 right each way
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert m["token_accuracy"] == pytest.approx(5 / 7)
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["PER"]["f1"] == 1.0


def test_strict_iob2_does_not_count_entities_that_start_with_i():
    gold = [["O", "B-PER", "I-PER", "O"]]
    pred = [["O", "I-PER", "I-PER", "O"]]  # IOB1-style start
    assert ner_metrics(gold, pred)["f1"] == 1.0  # default (conlleval) mode: I- after O starts an entity
    assert ner_metrics(gold, pred, strict_iob2=True)["f1"] == 0.0


def test_trainer_metrics_score_only_labelled_positions():
    names = ["O", "B-PER", "I-PER"]
    labels = np.array([[-100, 1, -100, 2, 0, -100]])  # CLS, word1 (2 sub-tokens), word2, word3, SEP
    logits = np.full((1, 6, 3), -5.0)
    for pos, tag in enumerate([0, 1, 0, 2, 0, 0]):  # the sub-token at position 2 is wrong but ignored
        logits[0, pos, tag] = 5.0
    gold, pred = word_tags(logits, labels, names)
    assert gold == pred == [["B-PER", "I-PER", "O"]]
    assert ner_compute_metrics(names, False)((logits, labels))["f1"] == 1.0


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(
        {"labels": ["fresh", "rotten"], "matrix": [[30, 5], [8, 20]]}, tmp_path / "cm.png", "test"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
