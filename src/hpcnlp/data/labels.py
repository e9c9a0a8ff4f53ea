"""What the two fine-tuning readers share: file formats, the label set, splits, and data errors.

A data error names the file, the row or line, and the fix, exactly like a config problem, so the
job prints it the same way and refuses to start before anything is written.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.config import ConfigError, FinetuneDataConfig, Problem
from hpcnlp.runtime import stack
from hpcnlp.runtime.io import is_inside

log = logging.getLogger(__name__)

IGNORE = -100  # the label id PyTorch's cross-entropy skips (sub-tokens, padding)
MAX_ERRORS_SHOWN = 20  # a file with 10,000 bad rows should not print 10,000 lines
CHECK_DECODE_CHARS = 50_000_000  # `hpcnlp check` decodes this much of each file (a second or so)

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".conll": "conll",
    ".txt": "conll",
    ".bio": "conll",
    ".iob": "conll",
}


class DataError(ConfigError):
    """Bad rows in a data file. `problems` keys are 'row N' / 'line N'; `source` is the file."""

    def __init__(self, source: str, problems: list[Problem], total: int | None = None):
        total = total or len(problems)
        shown = problems[:MAX_ERRORS_SHOWN]
        if total > len(shown):
            shown.append(
                Problem(
                    key="...",
                    message=f"{total - len(shown)} more problems like these",
                    fix="fix the ones above and run again",
                )
            )
        super().__init__(source, shown)


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    return _EXTENSIONS.get(Path(path).suffix.lower(), "")


def decoded_lines(path: str, encoding: str) -> Iterator[str]:
    """The lines of a text file (newlines kept), or a DataError at the first bytes `encoding` cannot
    decode, naming its line and byte offset. Labelled data is never decoded with replacements: a
    wrong encoding would silently become wrong text and labels. The byte offset is exact; the line
    is too for ASCII-compatible encodings (UTF-8, Latin-1, cp1252...), for UTF-16/32 it may be one short."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line, offset, pending = 1, 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.readline()  # bytes up to b"\n": a whole line in any ASCII-compatible encoding
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeError as e:
                if isinstance(e, UnicodeDecodeError):
                    # e.object may begin with bytes the decoder held back from the previous read.
                    at = offset + e.start - (len(e.object) - len(raw))
                    what = f"byte {at} ({e.object[e.start : e.end]!r}) is not {encoding} ({e.reason})"
                else:  # a decoder's own complaint without a position (utf-16 without a BOM)
                    what = f"near byte {offset}: not {encoding} ({e})"
                raise DataError(
                    path,
                    [
                        Problem(
                            key=f"line {line}",
                            message=what,
                            fix=f"set data.encoding to the "
                            f"file's encoding (e.g. latin-1 or cp1252), or save the file as "
                            f"{encoding}",
                        )
                    ],
                ) from None
            offset += len(raw)
            *lines, pending = pending.split("\n")
            for text in lines:
                yield text + "\n"
                line += 1
            if not raw:
                break
    if pending:
        yield pending


def decoding_problems(key: str, path: str, encoding: str) -> list[Problem]:
    """For `hpcnlp check`: the first CHECK_DECODE_CHARS of the file decode (the readers check all of it)."""
    seen = 0
    try:
        for text in decoded_lines(path, encoding):
            seen += len(text)
            if seen > CHECK_DECODE_CHARS:
                break
    except DataError as e:
        p = e.problems[0]
        return [Problem(key=key, message=f"'{path}' {p.key}: {p.message}", fix=p.fix)]
    return []


def table_records(path: str, fmt: str, encoding: str, multiline: bool = False, limit_chars: int | None = None) -> int:
    """The number of records of a CSV/TSV file, or a DataError naming the line of the first record that
    is not exactly one line. A quote opened and not closed on its line would otherwise swallow the rows
    after it into one field (pandas does so without a word), so a record spanning lines is refused, and
    so is an unbalanced or stray quote, unless `multiline` (data.multiline_rows) says quoted fields hold
    line breaks. Blank lines are no records (pandas skips them too)."""
    reader = csv.reader(decoded_lines(path, encoding), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    records, start, seen = 0, 1, 0
    fix = (
        'close the quote on its line (a quote inside a quoted field is written twice: ""); if fields '
        "really hold line breaks, set data.multiline_rows: true"
    )
    try:
        for record in reader:
            if reader.line_num != start and not multiline:
                end = reader.line_num
                message = f"a quote opened on this line closes on line {end}: {end - start + 1} lines read as one row"
                raise DataError(path, [Problem(key=f"line {start}", message=message, fix=fix)])
            records += bool(record)
            seen += sum(map(len, record))
            start = reader.line_num + 1
            if limit_chars and seen > limit_chars:
                break
    except csv.Error as e:
        raise DataError(
            path, [Problem(key=f"line {start}", message=f"unbalanced or stray quote ({e})", fix=fix)]
        ) from None
    return records - 1  # the header


def read_columns(path: str, fmt: str, encoding: str = "utf-8") -> list[str]:
    """Column names from the header or first record only: cheap enough for `hpcnlp check`."""
    if fmt in ("csv", "tsv"):
        import pandas as pd

        return list(pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", nrows=0, encoding=encoding).columns)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt == "jsonl":
        for line in decoded_lines(path, encoding):
            if line.strip():
                record = json.loads(line)
                return list(record) if isinstance(record, dict) else []
    return []


def data_file_problems(
    task: str,
    allowed: tuple[str, ...],
    wanted: dict[str, str | None],
    data: FinetuneDataConfig,
    pending: Iterable[str] = (),
) -> list[Problem]:
    """Files exist, formats are among the task's `allowed`, its `wanted` columns (key -> column) exist
    (header only; rows are checked at read time). Files in `pending` (made by an earlier pipeline stage)
    are not checked yet. hpcnlp.tasks.data_problems calls it with the task's own formats and columns."""
    out = []
    for name, path in data.files().items():
        key = f"data.{name}"
        if is_inside(path, pending):
            continue
        if not Path(path).is_file():
            out.append(
                Problem(
                    key=key,
                    message=f"no such file '{path}'",
                    fix="correct the path (relative paths are from the working dir)",
                )
            )
            continue
        fmt = detect_format(path, data.format)
        if fmt not in allowed:
            out.append(
                Problem(
                    key=key,
                    message=f"'{path}': format {fmt or 'unknown'!r} does not fit {task}",
                    fix=f"use one of {list(allowed)} (by file extension or data.format)",
                )
            )
            continue
        if fmt != "parquet":  # text formats: a wrong data.encoding is reported here, not mid-run
            undecodable = decoding_problems(key, path, data.encoding)
            if undecodable:
                out += undecodable
                continue
        if fmt == "conll":
            continue
        if fmt != "jsonl" and not stack.installed():  # pandas/pyarrow read the header: training stack
            stack.skipped(f"{key}: the columns of '{path}'")
            continue
        try:
            if fmt in ("csv", "tsv"):
                table_records(path, fmt, data.encoding, data.multiline_rows, CHECK_DECODE_CHARS)
        except DataError as e:
            p = e.problems[0]
            out.append(Problem(key=key, message=f"'{path}' {p.key}: {p.message}", fix=p.fix))
            continue
        try:
            columns = read_columns(path, fmt, data.encoding)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file, reported as such
            out.append(
                Problem(
                    key=key,
                    message=f"'{path}' cannot be read as {fmt} ({e})".replace("\n", " "),
                    fix="check the file and data.format",
                )
            )
            continue
        for col_key, col in wanted.items():
            if col is not None and col not in columns:
                out.append(
                    Problem(
                        key=f"data.{col_key}",
                        message=f"unknown column '{col}' in '{path}' (columns: {columns})",
                        fix="set it to one of the file's columns",
                    )
                )
    return out


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Numbers in numeric order ('2' before '10'), then names alphabetically."""
    return sorted(set(labels), key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def label_maps(names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    """id2label / label2id as they go into the model's config.json."""
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def unknown_label_problem(
    label: str, names: list[str], split: str, where: str, from_config: bool, times: int = 1
) -> Problem:
    more = f" ({times} times; first here)" if times > 1 else ""
    if from_config:
        return Problem(
            key=where,
            message=f"label '{label}' is not in the label set {names}{more}",
            fix="correct the label or add it to data.label_names",
        )
    return Problem(
        key=where,
        message=f"label '{label}' never occurs in the training data{more}: the label set "
        f"of this {split} file differs from train's {names}",
        fix="correct the label, or list the full label set in data.label_names",
    )


@dataclass
class Labelled:
    """Tokenized splits (train, validation, test, extra eval names) and the label set they share."""

    splits: dict  # name -> datasets.Dataset
    label_names: list[str]
    files: dict[str, str] = field(default_factory=dict)  # split name -> file it came from
    stats: dict = field(default_factory=dict)


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of train, stratified by label (unstratified if a label has a single row)."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(examples)))
    labels = [e.label for e in examples] if hasattr(examples[0], "label") else None  # NER: not stratified
    try:
        train_idx, val_idx = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as e:
        log.warning("validation split not stratified (%s)", e)
        train_idx, val_idx = train_test_split(idx, test_size=fraction, random_state=seed)
    return [examples[i] for i in sorted(train_idx)], [examples[i] for i in sorted(val_idx)]


def check_labels(
    path: str, split: str, examples: list, label_names: list[str], from_config: bool, labels_of=lambda e: [e.label]
) -> None:
    """Each unknown label once, at its first occurrence, with how often it occurs."""
    known, first, count = set(label_names), {}, {}
    for e in examples:
        for i, label in enumerate(labels_of(e)):
            if label not in known:
                first.setdefault(label, e.token_where(i) if hasattr(e, "token_where") else e.where)
                count[label] = count.get(label, 0) + 1
    problems = [
        unknown_label_problem(label, label_names, split, where, from_config, count[label])
        for label, where in first.items()
    ]
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
        held = int(len(examples["train"]) * data.validation_split)  # sklearn rounds the held-out share up
        if len(examples["train"]) < 2 or len(examples["train"]) - held < 1:
            raise DataError(
                data.train_file,
                [
                    Problem(
                        key="data.validation_split",
                        message=f"{len(examples['train'])} example(s): too few to hold out "
                        f"{data.validation_split:.0%} for validation and still train",
                        fix="give data.validation_file, or more training data",
                    )
                ],
            )
        examples["train"], examples["validation"] = _split(examples["train"], data.validation_split, data.seed)
    if data.test_file:
        files["test"], examples["test"] = data.test_file, read(data.test_file)
    for name, path in data.extra_eval_files.items():
        files[name], examples[name] = path, read(path)

    from_config = data.label_names is not None
    label_names = (
        list(data.label_names) if from_config else label_set(label for e in examples["train"] for label in labels_of(e))
    )
    for split, exs in examples.items():
        check_labels(files[split], split, exs, label_names, from_config, labels_of)
    if data.max_train_samples:
        examples["train"] = examples["train"][: data.max_train_samples]
    if data.max_eval_samples:
        examples.update({k: v[: data.max_eval_samples] for k, v in examples.items() if k != "train"})
    return examples, files, label_names


def length_sorted(ds):
    """Eval sets sorted longest first: sequential batches then hold similar lengths (little padding)."""
    return ds.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True).sort("length", reverse=True)
