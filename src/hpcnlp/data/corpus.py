"""Read a text corpus as documents: plain text, JSONL or Parquet; files, globs or directories.

Files may be compressed (.gz .bz2 .xz .zst: read as streams). Documents are streamed, so corpus size
never meets RAM; a big uncompressed text/JSONL file is read as byte ranges cut at line or paragraph
boundaries (`split_points`), so one multi-GB file becomes many shards of work.
Undecodable bytes are replaced and counted; empty documents are counted and dropped later.
"""

from __future__ import annotations

import bz2
import codecs
import fnmatch
import glob
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

from hpcnlp.config import CorpusConfig, Problem

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def expand_files(patterns: list[str], exclude: list[str] = ()) -> list[str]:
    """Files, globs (`**` recursive) and directories (all files below) -> sorted unique file list,
    without those whose path matches an `exclude` glob (fnmatch: `*` also matches `/`)."""
    out: set[str] = set()
    for pattern in patterns:
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            p = Path(match)
            if p.is_dir():
                out.update(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            elif p.is_file():
                out.add(str(p))
    return sorted(f for f in out if not any(fnmatch.fnmatch(f, x) for x in exclude))


def corpus_problems(data: CorpusConfig) -> list[Problem]:
    """Every train/eval pattern matches a file (`hpcnlp check`; the text itself is read by prepare)."""
    out = []
    keyed = [
        (f"data.sources[{i}].files" if data.sources else "data.train_files", p)
        for i, s in enumerate(data.source_list())
        for p in s.files
    ]
    for key, pattern in keyed + [("data.eval_files", p) for p in data.eval_files]:
        if not expand_files([pattern]):
            out.append(
                Problem(
                    key=key,
                    message=f"'{pattern}' matches no file",
                    fix="correct the path or glob (relative paths are from the working dir)",
                )
            )
    for i, source in enumerate(data.source_list()):
        key = f"data.sources[{i}]" if data.sources else "data.train_files"
        files = expand_files(source.files, source.exclude)
        if not files and all(expand_files([p]) for p in source.files):
            out.append(Problem(key=key, message="data.exclude leaves no file", fix="narrow the exclude globs"))
        # Only the cheap case of an empty corpus (every file 0 bytes); blank-only text is found by prepare.
        elif files and all(os.path.getsize(f) == 0 for f in files):
            out.append(
                Problem(
                    key=key,
                    message=f"all {len(files)} file(s) it matches are empty: no text to train on",
                    fix="point it at files with text",
                )
            )
    return out


def compression(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return suffix if suffix in OPENERS or suffix == ".zst" else None


def open_binary(path: str):
    """A file, or the decompressed stream of a .gz/.bz2/.xz/.zst file (read sequentially, never whole)."""
    kind = compression(path)
    if kind == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return OPENERS[kind](path, "rb") if kind else open(path, "rb")


def splittable(path: str, fmt: str, sample_by: str, encoding: str) -> bool:
    """A file that can be cut by byte range: uncompressed text/JSONL in an encoding where b"\n" is "\n"."""
    kind = detect_format(path, fmt)
    return (
        compression(path) is None
        and kind != "parquet"
        and not (kind == "text" and sample_by == "document")
        and "\n".encode(encoding) == b"\n"
        and "\n\n".encode(encoding) == b"\n\n"
    )


def split_points(path: str, every: int, boundary: bytes) -> list[int]:
    """Byte offsets that cut `path` into pieces of about `every` bytes, each just after a `boundary`
    (b"\n\n": a paragraph end; b"\n": a line end). A paragraph longer than `every` bytes is cut at a
    line end (so a piece stays bounded); a line is never cut."""
    size, cuts = os.path.getsize(path), [0]
    with open(path, "rb") as f:
        while cuts[-1] + every < size:
            start = cuts[-1] + every
            cut = _next_boundary(f, start, every, boundary)
            if cut is None and (boundary == b"\n" or start + every < size):  # not in the file's last paragraph
                cut = _next_boundary(f, start, size - start, b"\n")
            if cut is None or cut >= size:
                break  # the rest is one piece
            cuts.append(cut)
    return cuts + [size]


def _next_boundary(f, start: int, limit: int, boundary: bytes) -> int | None:
    """The offset just after the first `boundary` at or after `start` within `limit` bytes (read in 1 MiB chunks)."""
    f.seek(start)
    tail, read = b"", 0
    while read < limit and (chunk := f.read(min(1 << 20, limit - read))):
        window = tail + chunk
        if (at := window.find(boundary)) >= 0:
            return start + read - len(tail) + at + len(boundary)
        read += len(chunk)
        tail = window[-(len(boundary) - 1) :] if len(boundary) > 1 else b""
    return None


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


def _decoded_lines(
    path: str, counter: _ReplacementCounter, encoding: str = "utf-8", start: int = 0, end: int | None = None
) -> Iterator[str]:
    # Incremental decoding in 1 MiB chunks: a single 1 GB line is still read in bounded pieces
    # of bytes (the line itself must fit in memory as text, as it will as one document anyway).
    decoder = codecs.getincrementaldecoder(encoding)(errors=counter.name)
    pending = ""
    with open_binary(path) as f:
        if start:
            f.seek(start)
        left = None if end is None else end - start
        while chunk := f.read(1 << 20 if left is None else min(1 << 20, left)):
            if left is not None:
                left -= len(chunk)
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            yield from lines
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def _text_documents(lines: Iterator[str], sample_by: str) -> Iterator[str]:
    if sample_by == "line":
        yield from (line.rstrip("\r") for line in lines)
        return
    if sample_by == "document":
        yield "\n".join(line.rstrip("\r") for line in lines)
        return
    para: list[str] = []
    found = False
    for line in lines:
        if line.strip():
            para.append(line.rstrip("\r"))
        elif para:
            yield "\n".join(para)
            para, found = [], True
    if para:
        yield "\n".join(para)
    elif not found:
        yield ""  # an empty or blank-only file: one empty document, counted as skipped


def _jsonl_documents(path: str, lines: Iterator[str], text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):  # lineno counts from the piece's start
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({e.msg}). Fix: one JSON object per line, or set data.format"
            ) from None
        if text_field not in record:
            raise ValueError(
                f"{path}:{lineno}: no field '{text_field}' (has {sorted(record)[:8]}). Fix: set data.text_field"
            ) from None
        yield record[text_field] or ""


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(open_binary(path))
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column '{text_field}' (has {pf.schema_arrow.names[:8]}). Fix: set data.text_field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        yield from (t or "" for t in batch.column(0).to_pylist())


def read_documents(
    files: list, fmt: str = "auto", text_field: str = "text", sample_by: str = "paragraph", encoding: str = "utf-8"
) -> Iterator[dict]:
    """Yield {"text", "replaced_bytes"} per document, empty ones included (they are counted, then dropped).

    `files`: paths, or (path, start, end) byte ranges from `split_points`.
    `encoding` (data.encoding) decodes text and JSONL files; Parquet strings are UTF-8 by format.
    """
    for item in files:
        path, start, end = (item, 0, None) if isinstance(item, str) else item
        counter = _ReplacementCounter()
        kind = detect_format(path, fmt)
        lines = _decoded_lines(path, counter, encoding, start, end)
        if kind == "parquet":
            docs = _parquet_documents(path, text_field)
        elif kind == "jsonl":
            docs = _jsonl_documents(path, lines, text_field)
        else:
            docs = _text_documents(lines, sample_by)
        seen = 0
        for doc in docs:
            # Attribute replaced bytes to the document being read when they were found.
            yield {"text": doc.strip(), "replaced_bytes": counter.count - seen}
            seen = counter.count
        if counter.count > seen:  # bytes replaced in a trailing empty part
            yield {"text": "", "replaced_bytes": counter.count - seen}
