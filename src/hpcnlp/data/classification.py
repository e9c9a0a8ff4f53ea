"""Sequence-classification data: CSV, TSV, JSONL or Parquet rows with a text (or text pair) and a label.

Every row is checked before anything is tokenized: a missing or empty text, a missing label, a label
outside the label set, each is reported with file, row and fix (DataError). The label set is
data.label_names or the sorted labels of the training file; evaluation files must not bring new ones.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from hpcnlp.config import FinetuneDataConfig, Problem
from hpcnlp.data.labels import (
    DataError,
    Labelled,
    decoded_lines,
    detect_format,
    length_sorted,
    read_splits,
    table_records,
)

log = logging.getLogger(__name__)


@dataclass
class Example:
    where: str  # "row 12" (tables, 1-based, header not counted) or "line 12" (JSONL)
    text: str
    label: str
    text_pair: str | None = None


def _records(path: str, fmt: str, encoding: str, multiline: bool = False):
    """(where, record dict) for every row. Tables are read as strings: '1' stays '1', '' stays ''."""
    if fmt == "jsonl":
        for n, line in enumerate(decoded_lines(path, encoding), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    path, [Problem(key=f"line {n}", message=f"not valid JSON ({e})", fix="one JSON object per line")]
                ) from None
            yield f"line {n}", record if isinstance(record, dict) else {}
        return
    import pandas as pd

    if fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        lines = table_records(path, fmt, encoding, multiline)  # first: it names a bad quote's line
        try:
            frame = pd.read_csv(
                path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False, encoding=encoding
            )
        except UnicodeError as e:
            for _ in decoded_lines(path, encoding):  # pandas does not say where: this raises naming the line
                pass
            raise DataError(
                path,
                [
                    Problem(
                        key="<file>", message=f"not {encoding} ({e})", fix="set data.encoding to the file's encoding"
                    )
                ],
            ) from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:  # pandas says where; one line of it
            why = " ".join(str(e).split())
            raise DataError(
                path,
                [
                    Problem(
                        key="<file>",
                        message=f"not valid {fmt.upper()} ({why})",
                        fix="check the file (quotes, separators) and data.format",
                    )
                ],
            ) from None
        if lines != len(frame):  # the two readers disagree: say so rather than train on either
            problem = Problem(
                key="<file>",
                message=f"{len(frame)} rows read from {lines} lines",
                fix="check the file's quotes and separators, and data.format",
            )
            raise DataError(path, [problem])
    for n, record in enumerate(frame.to_dict("records"), 1):
        yield f"row {n}", record


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # None, NaN
        return ""
    return str(value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label(value) -> tuple[str, str]:
    """(kind, label) of a label cell, read by its value type: a number is its value (1 and 1.0 are the
    class "1"), true/false are bools, text is text. ("", "") when empty."""
    if isinstance(value, (bool, np.bool_)):
        return "true/false", "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return "number", str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return "", ""
        return "number", str(int(value)) if float(value).is_integer() else repr(float(value))
    text = _as_text(value).strip()
    return ("text" if text else ""), text


def read_examples(path: str, data: FinetuneDataConfig) -> list[Example]:
    """All rows of one file, or DataError naming every bad row (up to a limit)."""
    fmt = detect_format(path, data.format)
    examples, problems, first_of_kind = [], [], {}
    columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
    for where, record in _records(path, fmt, data.encoding, data.multiline_rows):
        missing = [c for c in columns if c not in record]
        if missing:
            problems.append(
                Problem(
                    key=where,
                    message=f"unknown column(s) {missing} (has {sorted(record)})",
                    fix="set data.text_column / data.label_column to the file's columns",
                )
            )
            continue
        text = _as_text(record[data.text_column]).strip()
        kind, label = _label(record[data.label_column])
        pair = _as_text(record[data.text_pair_column]).strip() if data.text_pair_column else None
        if not text or (data.text_pair_column and not pair):
            col = data.text_column if not text else data.text_pair_column
            problems.append(
                Problem(key=where, message=f"empty text in column '{col}'", fix="fill it in or remove the row")
            )
        elif not label:
            problems.append(
                Problem(
                    key=where,
                    message=f"label missing (column '{data.label_column}')",
                    fix="give every row a label, or remove the row",
                )
            )
        else:
            first_of_kind.setdefault(kind, (where, record[data.label_column]))
            examples.append(Example(where, text, label, pair))
    if fmt in ("csv", "tsv") and examples and all(_number(e.label) is not None for e in examples):
        # A table's cells are text: a label column of numbers written two ways (1, 1.0) is one class each.
        examples = [Example(e.where, e.text, _label(_number(e.label))[1], e.text_pair) for e in examples]
    if len(first_of_kind) > 1:  # 1 vs "1" vs true: one class or three? The file must say one way.
        seen = ", ".join(f"{k} ({w}: {v!r})" for k, (w, v) in first_of_kind.items())
        problems.append(
            Problem(
                key=f"column '{data.label_column}'",
                message=f"labels of several kinds: {seen}",
                fix="write every label the same way (all numbers, all text or all true/false)",
            )
        )
    if problems:
        raise DataError(path, problems)
    if not examples:
        raise DataError(path, [Problem(key="<file>", message="no rows", fix="point it at a file with data")])
    return examples


def load(data: FinetuneDataConfig, tokenizer) -> Labelled:
    from datasets import Dataset

    examples, files, label_names = read_splits(data, lambda p: read_examples(p, data), lambda e: [e.label])
    label2id = {n: i for i, n in enumerate(label_names)}

    def tokenize(batch):
        pairs = batch["text_pair"] if data.text_pair_column else None
        return tokenizer(batch["text"], pairs, truncation=True, max_length=data.max_seq_length)

    splits, stats = {}, {}
    for name, exs in examples.items():
        columns = {
            "where": [e.where for e in exs],
            "text": [e.text for e in exs],
            "labels": [label2id[e.label] for e in exs],
        }
        if data.text_pair_column:
            columns["text_pair"] = [e.text_pair for e in exs]
        ds = Dataset.from_dict(columns).map(tokenize, batched=True)
        splits[name] = ds if name == "train" else length_sorted(ds)
        stats[name] = {
            "file": files[name],
            "examples": len(exs),
            "truncated": sum(len(x) >= data.max_seq_length for x in ds["input_ids"]),
        }
    return Labelled(splits, label_names, files, stats)
