"""Classification reader: the shipped Rotten Tomatoes sample, every table format, and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hpcnlp.config import FinetuneDataConfig
from hpcnlp.data import classification
from hpcnlp.data.labels import DataError
from hpcnlp.tasks import data_problems as data_file_problems

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "classification" / "rotten-tomatoes"


def _rows(n=40) -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "train.csv").head(n)


def test_shipped_sample_splits_labels_and_dynamic_lengths(minilm_tokenizer):
    data = FinetuneDataConfig(
        train_file=str(SAMPLE / "train.csv"),
        validation_file=str(SAMPLE / "validation.csv"),
        test_file=str(SAMPLE / "test.csv"),
        max_seq_length=64,
    )
    loaded = classification.load(data, minilm_tokenizer)
    assert loaded.label_names == ["fresh", "rotten"]
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 2000, "validation": 400, "test": 400}
    train = loaded.splits["train"]
    lengths = [len(ids) for ids in train["input_ids"]]
    assert min(lengths) < 20 and max(lengths) == 64  # not padded; truncated at max_seq_length
    assert set(train["labels"]) == {0, 1}
    eval_lengths = [len(ids) for ids in loaded.splits["test"]["input_ids"]]
    assert eval_lengths == sorted(eval_lengths, reverse=True)  # eval sets longest first
    # the shipped sample is split by movie: no movie on two sides
    movies = {k: set(pd.read_csv(SAMPLE / f"{k}.csv").movie) for k in ("train", "validation", "test")}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]


def test_one_file_split_is_stratified_and_seeded(tmp_path, minilm_tokenizer):
    data = FinetuneDataConfig(train_file=str(SAMPLE / "train.csv"), validation_split=0.2, seed=3)
    a = classification.load(data, minilm_tokenizer)
    b = classification.load(data, minilm_tokenizer)
    assert len(a.splits["validation"]) == 400 and len(a.splits["train"]) == 1600
    assert a.splits["validation"]["where"] == b.splits["validation"]["where"]
    share = lambda ds: sum(ds["labels"]) / len(ds)  # noqa: E731 - share of 'rotten'
    assert share(a.splits["validation"]) == pytest.approx(share(a.splits["train"]), abs=0.01)
    assert not set(a.splits["train"]["where"]) & set(a.splits["validation"]["where"])


@pytest.mark.parametrize("suffix", ["tsv", "jsonl", "parquet"])
def test_every_table_format_reads_the_same(tmp_path, suffix):
    rows = _rows()
    path = tmp_path / f"train.{suffix}"
    if suffix == "tsv":
        rows.to_csv(path, sep="\t", index=False)
    elif suffix == "jsonl":
        rows.to_json(path, orient="records", lines=True)
    else:
        rows.to_parquet(path)
    data = FinetuneDataConfig(train_file=str(path))
    examples = classification.read_examples(str(path), data)
    assert [(e.text, e.label) for e in examples] == list(zip(rows.text.str.strip(), rows.label))


def test_int_labels_sort_numerically_and_text_pairs(tmp_path, minilm_tokenizer):
    rows = [{"premise": f"sentence {i}", "hypothesis": f"other {i}", "label": i % 11} for i in range(33)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = FinetuneDataConfig(
        train_file=str(path), validation_file=str(path), text_column="premise", text_pair_column="hypothesis"
    )
    loaded = classification.load(data, minilm_tokenizer)
    assert loaded.label_names == [str(i) for i in range(11)]  # '2' before '10'
    first = loaded.splits["train"][0]
    assert minilm_tokenizer.decode(first["input_ids"]) == "[CLS] sentence 0 [SEP] other 0 [SEP]"
    assert set(first["token_type_ids"]) == {0, 1}


def _expect(path, data, *fragments):
    with pytest.raises(DataError) as err:
        classification.read_splits(data, lambda p: classification.read_examples(p, data), lambda e: [e.label])
    text = "\n".join(err.value.lines)
    for fragment in (str(path), *fragments):
        assert fragment in text, text
    return text


def test_empty_text_and_missing_label_name_the_row(tmp_path):
    rows = _rows(10)
    rows.loc[3, "text"] = "   "
    rows.loc[6, "label"] = ""
    path = tmp_path / "bad.csv"
    rows.to_csv(path, index=False)
    text = _expect(
        path,
        FinetuneDataConfig(train_file=str(path)),
        "row 4: empty text in column 'text'",
        "row 7: label missing",
        "Fix:",
    )
    assert text.count("\n") == 1  # the two bad rows, nothing else


def test_label_outside_the_given_label_set(tmp_path):
    rows = _rows(10)
    rows.loc[2, "label"] = "rotton"
    path = tmp_path / "typo.csv"
    rows.to_csv(path, index=False)
    _expect(
        path,
        FinetuneDataConfig(train_file=str(path), label_names=["fresh", "rotten"]),
        "row 3: label 'rotton' is not in the label set",
        "data.label_names",
    )


def test_eval_label_set_differs_from_train(tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    _rows(20).to_csv(train, index=False)
    rows = _rows(5)
    rows.loc[4, "label"] = "plot"
    rows.to_csv(val, index=False)
    _expect(
        val,
        FinetuneDataConfig(train_file=str(train), validation_file=str(val)),
        "row 5: label 'plot' never occurs in the training data",
        "validation",
    )


def test_unknown_column_and_format_are_config_problems(tmp_path):
    path = tmp_path / "train.csv"
    _rows(5).to_csv(path, index=False)
    problems = data_file_problems(
        "sequence-classification", FinetuneDataConfig(train_file=str(path), label_column="sentiment")
    )
    assert [p.key for p in problems] == ["data.label_column"]
    assert "unknown column 'sentiment'" in problems[0].message and "movie" in problems[0].message
    conll = data_file_problems(
        "sequence-classification", FinetuneDataConfig(train_file=str(SAMPLE.parents[1] / "ner/wnut16/train.conll"))
    )
    assert "does not fit sequence-classification" in conll[0].message
    missing = data_file_problems("sequence-classification", FinetuneDataConfig(train_file=str(tmp_path / "no.csv")))
    assert "no such file" in missing[0].message


def test_labels_are_read_by_their_value_type(tmp_path):
    """JSONL 1, 1.0, 0, 0.0 are two classes, not four; a table's 1 and 1.0 too; 1 vs "1" vs true in one
    file is refused naming a row of each kind (one class or three? the file must say one way)."""
    import json

    from hpcnlp.data.classification import read_examples

    def labels(name, body):
        path = tmp_path / name
        path.write_text(body)
        return sorted({e.label for e in read_examples(str(path), FinetuneDataConfig(train_file=str(path)))})

    rows = lambda values: "\n".join(json.dumps({"text": f"t{i}", "label": v}) for i, v in enumerate(values))  # noqa: E731
    assert labels("numbers.jsonl", rows([1, 1.0, 0, 0.0])) == ["0", "1"]
    assert labels("bools.jsonl", rows([True, False])) == ["false", "true"]
    assert labels("table.csv", "text,label\na,1\nb,0\nc,1.0\n") == ["0", "1"]
    assert labels("words.csv", "text,label\na,pos\nb,1\n") == ["1", "pos"]
    with pytest.raises(DataError) as e:
        labels("mixed.jsonl", rows([1, "1", True]))
    [line] = e.value.lines
    assert "labels of several kinds: number (line 1: 1), text (line 2: '1'), true/false (line 3: True)" in line


def test_line_breaks_inside_quotes_are_read_only_when_the_config_says_so(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"leaves absolutely no\ncliche unexploited.",rotten\nfine,fresh\n')
    with pytest.raises(DataError, match="line 2: a quote opened on this line closes on line 3.*multiline_rows"):
        classification.read_examples(str(path), FinetuneDataConfig(train_file="x"))
    rows = classification.read_examples(str(path), FinetuneDataConfig(train_file="x", multiline_rows=True))
    assert [r.text for r in rows] == ["leaves absolutely no\ncliche unexploited.", "fine"]
