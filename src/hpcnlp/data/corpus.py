"""Read a text corpus as documents: plain text, JSONL or Parquet; files, globs or directories.

Documents are streamed (one generator per file shard), so corpus size never meets RAM.
Undecodable bytes are replaced and counted; empty documents are counted and dropped later.
"""
from __future__ import annotations

import codecs
import glob
import json
import os
from pathlib import Path
from typing import Iterator

from hpcnlp.config import CorpusConfig, Problem

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


def expand_files(patterns: list[str]) -> list[str]:
    """Files, globs (`**` recursive) and directories (all files below) -> sorted unique file list."""
    out: set[str] = set()
    for pattern in patterns:
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            p = Path(match)
            if p.is_dir():
                out.update(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            elif p.is_file():
                out.add(str(p))
    return sorted(out)


def corpus_problems(data: CorpusConfig) -> list[Problem]:
    """Every train/eval pattern matches a file (`hpcnlp check`; the text itself is read by prepare)."""
    out = []
    for key in ("train_files", "eval_files"):
        for pattern in getattr(data, key):
            if not expand_files([pattern]):
                out.append(Problem(key=f"data.{key}", message=f"'{pattern}' matches no file",
                                   fix="correct the path or glob (relative paths are from the working dir)"))
    # Only the cheap case of an empty corpus (every file 0 bytes); blank-only text is found by prepare.
    train = expand_files(data.train_files)
    if train and all(os.path.getsize(f) == 0 for f in train):
        out.append(Problem(key="data.train_files", message=f"all {len(train)} file(s) it matches are empty: "
                           "no text to train on", fix="point it at files with text"))
    return out


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes]
    if any(s in PARQUET_SUFFIXES for s in suffixes):
        return "parquet"
    if any(s in JSONL_SUFFIXES for s in suffixes):
        return "jsonl"
    return "text"


class _ReplacementCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self):
        self.count = 0
        self.name = f"hpcnlp-count-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, err: UnicodeDecodeError):
        self.count += err.end - err.start
        return "\ufffd", err.end


def _decoded_lines(path: str, counter: _ReplacementCounter, encoding: str = "utf-8") -> Iterator[str]:
    # Incremental decoding in 1 MiB chunks: a single 1 GB line is still read in bounded pieces
    # of bytes (the line itself must fit in memory as text, as it will as one document anyway).
    decoder = codecs.getincrementaldecoder(encoding)(errors=counter.name)
    pending = ""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            yield from lines
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def _text_documents(path: str, sample_by: str, counter: _ReplacementCounter, encoding: str) -> Iterator[str]:
    if sample_by == "line":
        yield from (line.rstrip("\r") for line in _decoded_lines(path, counter, encoding))
        return
    if sample_by == "document":
        yield "\n".join(line.rstrip("\r") for line in _decoded_lines(path, counter, encoding))
        return
    para: list[str] = []
    found = False
    for line in _decoded_lines(path, counter, encoding):
        if line.strip():
            para.append(line.rstrip("\r"))
        elif para:
            yield "\n".join(para)
            para, found = [], True
    if para:
        yield "\n".join(para)
    elif not found:
        yield ""  # an empty or blank-only file: one empty document, counted as skipped


def _jsonl_documents(path: str, text_field: str, counter: _ReplacementCounter, encoding: str) -> Iterator[str]:
    for lineno, line in enumerate(_decoded_lines(path, counter, encoding), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}). "
                             f"Fix: one JSON object per line, or set data.format") from None
        if text_field not in record:
            raise ValueError(f"{path}:{lineno}: no field '{text_field}' (has {sorted(record)[:8]}). "
                             f"Fix: set data.text_field") from None
        yield record[text_field] or ""


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column '{text_field}' (has {pf.schema_arrow.names[:8]}). "
                         f"Fix: set data.text_field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        yield from (t or "" for t in batch.column(0).to_pylist())


def read_documents(files: list[str], fmt: str = "auto", text_field: str = "text",
                   sample_by: str = "paragraph", encoding: str = "utf-8") -> Iterator[dict]:
    """Yield {"text", "replaced_bytes"} per document, empty ones included (they are counted, then dropped).

    Generator for `datasets.Dataset.from_generator`; `files` is a shard when num_proc > 1.
    `encoding` (data.encoding) decodes text and JSONL files; Parquet strings are UTF-8 by format.
    """
    for path in files:
        counter = _ReplacementCounter()
        kind = detect_format(path, fmt)
        if kind == "parquet":
            docs = _parquet_documents(path, text_field)
        elif kind == "jsonl":
            docs = _jsonl_documents(path, text_field, counter, encoding)
        else:
            docs = _text_documents(path, sample_by, counter, encoding)
        seen = 0
        for doc in docs:
            # Attribute replaced bytes to the document being read when they were found.
            yield {"text": doc.strip(), "replaced_bytes": counter.count - seen}
            seen = counter.count
        if counter.count > seen:  # bytes replaced in a trailing empty part
            yield {"text": "", "replaced_bytes": counter.count - seen}
