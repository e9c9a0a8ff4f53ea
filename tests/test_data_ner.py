"""NER reader and label alignment: the shipped WNUT sample, the real MiniLM tokenizer, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcnlp.config import FinetuneDataConfig
from hpcnlp.data import ner
from hpcnlp.data.labels import DataError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ner" / "wnut16"
WORDS = ["Clooney", "visited", "@emmarose99", "in", "Montreal"]
TAGS = ["B-person", "O", "B-person", "O", "B-geo-loc"]


def test_shipped_sample_reads_with_the_full_bio_label_set(minilm_tokenizer):
    data = FinetuneDataConfig(
        train_file=str(SAMPLE / "train.conll"),
        validation_file=str(SAMPLE / "validation.conll"),
        test_file=str(SAMPLE / "test.conll"),
    )
    loaded = ner.load(data, minilm_tokenizer)
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 300, "validation": 100, "test": 100}
    assert loaded.label_names[0] == "O" and len(loaded.label_names) == 21  # O + B/I for 10 types
    assert loaded.label_names[1:3] == ["B-company", "I-company"]
    first = loaded.splits["train"][0]
    assert len(first["labels"]) == len(first["input_ids"])
    assert loaded.stats["train"]["words"] > 5000


def test_alignment_on_real_sub_words(minilm_tokenizer):
    enc = minilm_tokenizer(WORDS, is_split_into_words=True)
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[:4] == ["[CLS]", "cl", "##oon", "##ey"] and tokens[-1] == "[SEP]"
    names = ner.complete_label_set(TAGS)  # O, B-geo-loc, I-geo-loc, B-person, I-person
    ids = [names.index(t) for t in TAGS]
    to_i = ner.i_form(names)
    first_only = ner.align_labels(enc.word_ids(), ids, False, to_i)
    all_tokens = ner.align_labels(enc.word_ids(), ids, True, to_i)
    as_tags = lambda labels: [names[x] if x >= 0 else None for x in labels]  # noqa: E731
    # [CLS] cl ##oon ##ey visited @ emma ##rose ##9 ##9 in montreal [SEP]
    assert as_tags(first_only) == [
        None,
        "B-person",
        None,
        None,
        "O",
        "B-person",
        None,
        None,
        None,
        None,
        "O",
        "B-geo-loc",
        None,
    ]
    assert as_tags(all_tokens) == [
        None,
        "B-person",
        "I-person",
        "I-person",
        "O",
        "B-person",
        "I-person",
        "I-person",
        "I-person",
        "I-person",
        "O",
        "B-geo-loc",
        None,
    ]


def test_label_all_tokens_labels_train_sub_tokens_but_eval_counts_words(tmp_path, minilm_tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"tokens": WORDS, "tags": TAGS}) + "\n")
    data = FinetuneDataConfig(train_file=str(path), validation_file=str(path), label_all_tokens=True)
    loaded = ner.load(data, minilm_tokenizer)
    train, val = loaded.splits["train"][0], loaded.splits["validation"][0]
    assert sum(x != ner.IGNORE for x in train["labels"]) == 11  # every sub-token
    assert sum(x != ner.IGNORE for x in val["labels"]) == len(WORDS)  # one per word


def test_conll_spaces_docstart_and_line_numbers(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\n\n\nPeter\tB-PER\nBlackburn\tI-PER\n")
    sents = ner.read_conll(str(path))
    assert [(s.tokens, s.tags, s.where) for s in sents] == [
        (["EU", "rejects"], ["B-ORG", "O"], "line 3"),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"], "line 7"),
    ]


def _error(path, **data) -> str:
    cfg = FinetuneDataConfig(train_file=str(path), **data)
    with pytest.raises(DataError) as err:
        ner.read_splits(cfg, lambda p: ner.read_sentences(p, cfg), lambda s: s.tags, ner.complete_label_set)
    text = "\n".join(err.value.lines)
    assert str(path) in text and "Fix:" in text
    return text


def test_tokens_tags_length_mismatch_and_empty_sentence(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"tokens": WORDS, "tags": TAGS})
        + "\n"
        + json.dumps({"tokens": WORDS, "tags": TAGS[:4]})
        + "\n\n"
        + json.dumps({"tokens": [], "tags": []})
        + "\n"
    )
    text = _error(path)
    assert "line 2: 5 tokens but 4 tags" in text and "line 4: empty sentence" in text


def test_token_without_tag_and_bad_tag(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Peter\tB-PER\nBlackburn\n\nParis\tLOC\n")
    assert "line 2: token without a tag" in _error(path)
    path.write_text("Peter\tB-PER\n\nParis\tLOC\n")
    assert "line 3: tag 'LOC' is not O, B-TYPE or I-TYPE" in _error(path)


def test_i_after_o_is_counted_and_fails_only_in_strict_mode(tmp_path, minilm_tokenizer, caplog):
    lines = (SAMPLE / "train.conll").read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if line.endswith("\tB-person"))
    lines[k] = lines[k].replace("B-person", "I-person")  # an I- that starts an entity (IOB1 style)
    path = tmp_path / "iob1.conll"
    path.write_text("\n".join(lines) + "\n")
    data = FinetuneDataConfig(train_file=str(path), validation_file=str(SAMPLE / "validation.conll"))
    assert ner.load(data, minilm_tokenizer).stats["train"]["i_after_o"] == 1
    assert "1 I- tags start an entity" in caplog.text
    assert f"line {k + 1}: I-person follows" in _error(path, strict_iob2=True)


def test_eval_tag_unknown_to_train(tmp_path):
    train, val = tmp_path / "train.conll", tmp_path / "val.conll"
    train.write_text("Peter\tB-person\nlaughs\tO\n")
    val.write_text("Paris\tB-geo-loc\n\nin\tO\nParis\tB-geo-loc\n")
    cfg = FinetuneDataConfig(train_file=str(train), validation_file=str(val))
    with pytest.raises(DataError) as err:
        ner.read_splits(cfg, lambda p: ner.read_sentences(p, cfg), lambda s: s.tags, ner.complete_label_set)
    assert err.value.lines == [
        f"{val}: line 1: label 'B-geo-loc' never occurs in the training data (2 times; "
        f"first here): the label set of this validation file differs from train's "
        f"['O', 'B-person', 'I-person']. Fix: correct the label, or list the full label set "
        f"in data.label_names"
    ]
