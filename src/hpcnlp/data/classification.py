"""Sequence-classification data: CSV, TSV, JSONL or Parquet rows with a text (or text pair) and a label.

Every row is checked before anything is tokenized: a missing or empty text, a missing label, a label
outside the label set, each is reported with file, row and fix (DataError). The label set is
data.label_names or the sorted labels of the training file; evaluation files must not bring new ones.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from hpcnlp.config import FinetuneDataConfig, Problem
from hpcnlp.data.labels import DataError, detect_format, sort_labels, unknown_label_problem

log = logging.getLogger(__name__)


@dataclass
class Example:
    where: str  # "row 12" (tables, 1-based, header not counted) or "line 12" (JSONL)
    text: str
    label: str
    text_pair: str | None = None


@dataclass
class Labelled:
    """Tokenized splits (train, validation, test, extra eval names) and the label set they share."""

    splits: dict  # name -> datasets.Dataset
    label_names: list[str]
    files: dict[str, str] = field(default_factory=dict)  # split name -> file it came from
    stats: dict = field(default_factory=dict)


def _records(path: str, fmt: str):
    """(where, record dict) for every row. Tables are read as strings: '1' stays '1', '' stays ''."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, [Problem(key=f"line {n}", message=f"not valid JSON ({e})",
                                                   fix="one JSON object per line")]) from None
                yield f"line {n}", record if isinstance(record, dict) else {}
        return
    import pandas as pd

    if fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
    for n, record in enumerate(frame.to_dict("records"), 1):
        yield f"row {n}", record


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None, NaN
        return ""
    return str(value)


def read_examples(path: str, data: FinetuneDataConfig) -> list[Example]:
    """All rows of one file, or DataError naming every bad row (up to a limit)."""
    fmt = detect_format(path, data.format)
    examples, problems = [], []
    columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
    for where, record in _records(path, fmt):
        missing = [c for c in columns if c not in record]
        if missing:
            problems.append(Problem(key=where, message=f"unknown column(s) {missing} (has {sorted(record)})",
                                    fix="set data.text_column / data.label_column to the file's columns"))
            continue
        text = _as_text(record[data.text_column]).strip()
        label = _as_text(record[data.label_column]).strip()
        pair = _as_text(record[data.text_pair_column]).strip() if data.text_pair_column else None
        if not text or (data.text_pair_column and not pair):
            col = data.text_column if not text else data.text_pair_column
            problems.append(Problem(key=where, message=f"empty text in column '{col}'",
                                    fix="fill it in or remove the row"))
        elif not label:
            problems.append(Problem(key=where, message=f"label missing (column '{data.label_column}')",
                                    fix="give every row a label, or remove the row"))
        else:
            examples.append(Example(where, text, label, pair))
    if problems:
        raise DataError(path, problems)
    if not examples:
        raise DataError(path, [Problem(key="<file>", message="no rows", fix="point it at a file with data")])
    return examples


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of train, stratified by label (unstratified if a label has a single row)."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(examples)))
    labels = [e.label for e in examples] if isinstance(examples[0], Example) else None  # NER: not stratified
    try:
        train_idx, val_idx = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as e:
        log.warning("validation split not stratified (%s)", e)
        train_idx, val_idx = train_test_split(idx, test_size=fraction, random_state=seed)
    return [examples[i] for i in sorted(train_idx)], [examples[i] for i in sorted(val_idx)]


def check_labels(path: str, split: str, examples: list, label_names: list[str], from_config: bool,
                 labels_of=lambda e: [e.label]) -> None:
    """Each unknown label once, at its first occurrence, with how often it occurs."""
    known, first, count = set(label_names), {}, {}
    for e in examples:
        for i, label in enumerate(labels_of(e)):
            if label not in known:
                first.setdefault(label, e.token_where(i) if hasattr(e, "token_where") else e.where)
                count[label] = count.get(label, 0) + 1
    problems = [unknown_label_problem(label, label_names, split, where, from_config, count[label])
                for label, where in first.items()]
    if problems:
        raise DataError(path, problems)


def read_splits(data: FinetuneDataConfig, read, labels_of, label_set=sort_labels) -> tuple[dict, dict, list[str]]:
    """Read every file, split off validation if needed, fix the label set, check every split against it.
    `read(path)` -> examples; `labels_of(example)` -> its labels; `label_set(train labels)` -> the label
    list when data.label_names does not give it. Shared by both tasks."""
    files = {"train": data.train_file}
    examples = {"train": read(data.train_file)}
    if data.validation_file:
        files["validation"] = data.validation_file
        examples["validation"] = read(data.validation_file)
    else:
        files["validation"] = f"{data.train_file} (held-out {data.validation_split:.0%}, seed {data.seed})"
        examples["train"], examples["validation"] = _split(examples["train"], data.validation_split, data.seed)
    if data.test_file:
        files["test"], examples["test"] = data.test_file, read(data.test_file)
    for name, path in data.extra_eval_files.items():
        files[name], examples[name] = path, read(path)

    from_config = data.label_names is not None
    label_names = list(data.label_names) if from_config else label_set(
        label for e in examples["train"] for label in labels_of(e))
    for split, exs in examples.items():
        check_labels(files[split], split, exs, label_names, from_config, labels_of)
    if data.max_train_samples:
        examples["train"] = examples["train"][:data.max_train_samples]
    if data.max_eval_samples:
        examples.update({k: v[:data.max_eval_samples] for k, v in examples.items() if k != "train"})
    return examples, files, label_names


def length_sorted(ds):
    """Eval sets sorted longest first: sequential batches then hold similar lengths (little padding)."""
    return ds.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True).sort(
        "length", reverse=True)


def load(data: FinetuneDataConfig, tokenizer) -> Labelled:
    from datasets import Dataset

    examples, files, label_names = read_splits(data, lambda p: read_examples(p, data), lambda e: [e.label])
    label2id = {n: i for i, n in enumerate(label_names)}

    def tokenize(batch):
        pairs = batch["text_pair"] if data.text_pair_column else None
        return tokenizer(batch["text"], pairs, truncation=True, max_length=data.max_seq_length)

    splits, stats = {}, {}
    for name, exs in examples.items():
        columns = {"where": [e.where for e in exs], "text": [e.text for e in exs],
                   "labels": [label2id[e.label] for e in exs]}
        if data.text_pair_column:
            columns["text_pair"] = [e.text_pair for e in exs]
        ds = Dataset.from_dict(columns).map(tokenize, batched=True)
        splits[name] = ds if name == "train" else length_sorted(ds)
        stats[name] = {"file": files[name], "examples": len(exs),
                       "truncated": sum(len(x) >= data.max_seq_length for x in ds["input_ids"])}
    return Labelled(splits, label_names, files, stats)
