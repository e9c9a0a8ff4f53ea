"""Bad input, everywhere: every malformed value or file ends with exit 2 and one `error:` line naming the
file, key or line and the fix, before anything is written; never a traceback, never a later failure.

Each case writes a small config and/or data file, runs the CLI in-process (a job command or `check`),
and expects exit 2, its fragment on an `error:` line, no traceback, and no output_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import SENTIMENT_DATA

from hpcnlp.cli import main
from hpcnlp.config import FinetuneDataConfig
from hpcnlp.data import classification, ner
from hpcnlp.data.labels import DataError
from hpcnlp.jobs import EXIT_CONFIG

LATIN1_CSV = b"text,label\ngood film,fresh\ncaf\xe9 au lait,rotten\n"  # b"\xe9" is latin-1 for 'é'
LATIN1_CONLL = b"Paris\tB-LOC\nis\tO\n\ncaf\xe9\tO\n"
# 12 rows; row 3's quote closes in row 4: pandas reads 11 rows ("it was fine,a\nrow 4", a) and says nothing.
UNBALANCED_CSV = b"text,label\n" + b"".join(b"row %d,a\n" % i for i in range(1, 13)).replace(
    b"row 3", b'"row 3', 1
).replace(b"row 4,", b'row 4",', 1)
QUOTE_LINE = "'{tmp}/train.csv' line 4: a quote opened on this line closes on line 5"
LATIN1_JSONL = b'{"text": "good", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n'


def _bad_byte(data: bytes) -> str:
    """'line N: byte B' of the first latin-1 byte, as the readers report it."""
    at = data.index(b"\xe9")
    line = data[:at].count(b"\n") + 1
    return f"line {line}: byte {at} (b'\\xe9') is not utf-8"


def _finetune(tmp: Path, data_file: str | None = None, content: bytes = b"", **cfg) -> dict:
    data = dict(SENTIMENT_DATA)
    if data_file:
        (tmp / data_file).write_bytes(content)
        data = {"train_file": str(tmp / data_file)}
    return {"job": "finetune", "task": "sequence-classification", "output_dir": str(tmp / "out"), "data": data, **cfg}


def _pretrain(tmp: Path, **data) -> dict:
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("Some text to pretrain on.\n\nA second paragraph.\n")
    return {
        "job": "pretrain",
        "output_dir": str(tmp / "out"),
        "data": {"train_files": [str(corpus / "*.txt")], "prepared_root": str(tmp / "prepared"), **data},
        "training": {"max_steps": 1},
    }


def _teacher(tmp: Path, model_type: str = "bert", positions: int = 512) -> str:
    """A fine-tuned classifier as far as distill's check reads it: its config.json."""
    path = tmp / f"teacher-{model_type}"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BertForSequenceClassification"],
                "model_type": model_type,
                "num_hidden_layers": 6,
                "max_position_embeddings": positions,
                "id2label": {"0": "fresh", "1": "rotten"},
            }
        )
    )
    return str(path)


def _distill(tmp: Path, **teacher) -> dict:
    return {
        "job": "distill",
        "teacher": _teacher(tmp, **teacher),
        "student_num_layers": 3,
        "output_dir": str(tmp / "out"),
        "data": dict(SENTIMENT_DATA),
    }


def _empty_corpus(tmp: Path) -> dict:
    cfg = _pretrain(tmp)
    (tmp / "corpus" / "a.txt").write_bytes(b"")
    return cfg


# (id, command, config(tmp_path), overrides, fragment expected on an `error:` line)
CASES = [
    (
        "csv-not-utf8",
        "finetune",
        lambda t: _finetune(t, "train.csv", LATIN1_CSV),
        [],
        f"data.train_file: '{{tmp}}/train.csv' {_bad_byte(LATIN1_CSV)}",
    ),
    (
        "conll-not-utf8",
        "finetune",
        lambda t: _finetune(t, "train.conll", LATIN1_CONLL, task="token-classification"),
        [],
        f"data.train_file: '{{tmp}}/train.conll' {_bad_byte(LATIN1_CONLL)}",
    ),
    (
        "jsonl-not-utf8",
        "check",
        lambda t: _finetune(t, "train.jsonl", LATIN1_JSONL),
        [],
        f"data.train_file: '{{tmp}}/train.jsonl' {_bad_byte(LATIN1_JSONL)}",
    ),
    (
        "fix-names-the-key",
        "finetune",
        lambda t: _finetune(t, "train.csv", LATIN1_CSV),
        [],
        "Fix: set data.encoding to the file's encoding (e.g. latin-1",
    ),
    (
        "unknown-codec",
        "check",
        lambda t: _finetune(t),
        ["data.encoding=utf-9"],
        "data.encoding: Value error, 'utf-9' is not a text encoding",
    ),
    (
        "not-a-text-codec",
        "check",
        lambda t: _finetune(t),
        ["data.encoding=rot13"],
        "data.encoding: Value error, 'rot13' is not a text encoding",
    ),
    (
        "corpus-unknown-codec",
        "pretrain",
        _pretrain,
        ["data.encoding=utf-9"],
        "data.encoding: Value error, 'utf-9' is not a text encoding",
    ),
    (
        "seq-longer-than-model",
        "finetune",
        lambda t: _finetune(t),
        ["data.max_seq_length=1024"],
        "data.max_seq_length: 1024 is longer than the 512 positions of model_name_or_path 'minilm-l6'. "
        "Fix: set data.max_seq_length to 512 or less",
    ),
    (
        "pretrain-seq-longer-than-model",
        "pretrain",
        _pretrain,
        ["data.max_seq_length=1024"],
        "data.max_seq_length: 1024 is longer than the 512 positions",
    ),
    (
        "distill-seq-longer-than-teacher",
        "check",
        _distill,
        ["data.max_seq_length=600"],
        "data.max_seq_length: 600 is longer than the 512 positions of teacher",
    ),
    (
        "roberta-positions-offset",
        "check",
        lambda t: _distill(t, model_type="roberta", positions=514),
        ["data.max_seq_length=513"],
        "data.max_seq_length: 513 is longer than the 512 positions of teacher",
    ),
    (
        "learning-rate-inf",
        "finetune",
        lambda t: _finetune(t),
        ["training.learning_rate=.inf"],
        "training.learning_rate: Input should be a finite number",
    ),
    (
        "unparsable-override",
        "finetune",
        lambda t: _finetune(t),
        ["output_dir=[x"],
        "<command line>: output_dir=[x: cannot be read",
    ),
    (
        "wrong-typed-training-key",
        "finetune",
        lambda t: _finetune(t),
        ["training.adam_beta2=high"],
        "training.adam_beta2: Input should be a valid number",
    ),
    ("empty-corpus", "pretrain", _empty_corpus, [], "data.train_files: all 1 file(s) it matches are empty"),
    ("csv-unbalanced-quote-check", "check", lambda t: _finetune(t, "train.csv", UNBALANCED_CSV), [], QUOTE_LINE),
    ("csv-unbalanced-quote-job", "finetune", lambda t: _finetune(t, "train.csv", UNBALANCED_CSV), [], QUOTE_LINE),
    (
        "csv-quote-never-closed",
        "finetune",
        lambda t: _finetune(t, "train.csv", b'text,label\ngood,a\n"bad,b\nfine,a\n'),
        [],
        "'{tmp}/train.csv' line 3: unbalanced or stray quote",
    ),
    (
        "tsv-stray-quote",
        "check",
        lambda t: _finetune(t, "train.tsv", b'text\tlabel\ngood\ta\n"so" good\tb\nfine\ta\n'),
        [],
        "data.train_file: '{tmp}/train.tsv' line 3: unbalanced or stray quote",
    ),
]


@pytest.mark.parametrize("command,make,overrides,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, command, make, overrides, fragment):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(make(tmp_path), sort_keys=False))
    code = main([command, "--config", str(config), *overrides])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_CONFIG, err
    assert any(fragment.format(tmp=tmp_path) in line for line in errors), errors
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_the_same_csv_is_accepted_with_its_encoding(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_finetune(tmp_path, "train.csv", LATIN1_CSV)))
    assert main(["check", "--config", str(config), "data.encoding=latin-1"]) == 0, capsys.readouterr().err
    rows = classification.read_examples(
        str(tmp_path / "train.csv"), FinetuneDataConfig(train_file="x", encoding="latin-1")
    )
    assert rows[1].text == "café au lait"


# The readers refuse undecodable files themselves too (what `check` sees of a file is only its start).
@pytest.mark.parametrize(
    "name,content,read",
    [
        ("t.csv", LATIN1_CSV, classification.read_examples),
        ("t.tsv", LATIN1_CSV.replace(b",", b"\t"), classification.read_examples),
        ("t.jsonl", LATIN1_JSONL, classification.read_examples),
        ("t.conll", LATIN1_CONLL, ner.read_sentences),
        ("n.jsonl", b'{"tokens": ["caf\xe9"], "tags": ["O"]}\n', ner.read_sentences),
    ],
)
def test_readers_name_line_byte_and_fix(tmp_path, name, content, read):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read(str(path), FinetuneDataConfig(train_file=str(path)))
    [line] = e.value.lines
    assert line.startswith(f"{path}: {_bad_byte(content)}") and "Fix: set data.encoding" in line


def test_utf16_without_bom_is_a_data_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(LATIN1_CSV)
    with pytest.raises(DataError, match="not utf-16"):
        classification.read_examples(str(path), FinetuneDataConfig(train_file="x", encoding="utf-16"))


def test_malformed_csv_row_is_a_data_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,fresh\nbad,rotten,extra\n")
    with pytest.raises(DataError, match="not valid CSV .*Expected 2 fields in line 3, saw 3"):
        classification.read_examples(str(path), FinetuneDataConfig(train_file="x"))


def test_corpus_uses_the_configured_encoding(tmp_path):
    from hpcnlp.data.corpus import read_documents

    path = tmp_path / "a.txt"
    path.write_bytes("café\n".encode("cp1252"))
    assert list(read_documents([str(path)])) == [{"text": "caf\ufffd", "replaced_bytes": 1}]  # counted, kept
    assert list(read_documents([str(path)], encoding="cp1252")) == [{"text": "café", "replaced_bytes": 0}]
