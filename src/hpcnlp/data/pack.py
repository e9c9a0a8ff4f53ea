"""`hpcnlp prepare`: tokenize a corpus once, pack it into fixed-length blocks, save it memory-mapped.

Packing: each document's tokens are followed by the separator token, documents are concatenated,
and the stream is cut into blocks of max_seq_length (with [CLS] ... [SEP] around each block).
So no block is padded but the last of each shard, and two documents never touch without a separator.

Scale-out. The corpus is planned into shards of about `data.shard_mb` of input (small files grouped,
big ones cut by byte range at paragraph/line boundaries; `plan`), a plan that depends on the files and
settings alone. Task t of N builds shards t, t+N, ... (N = a Slurm array and/or data.num_proc local
processes), each written atomically to <prepared_root>/<fingerprint>/shards/<k>/ (train.arrow,
eval.arrow, meta.json). The task that finds every shard done writes the index: order.npy (the
training order of the blocks: the sources mixed by weight, or one after another) and stats.json,
written last, whose presence means complete. The bytes do not depend on N, a rerun redoes only
unfinished shards, and a task's memory is bounded by one shard, whatever the corpus size.

A document goes to the eval split by a hash of its text (seeded), so the split needs no global view,
no document is on both sides and copies of one text land on one side.

`data.dedup` keeps the first copy of each text in corpus order (plan order: sources as listed, files
sorted, then data.eval_files, so eval texts already in the training text are dropped too). A shard's
document hashes (64-bit, read without tokenizing: ~7% of a build) are written once to
hashes/<k>.npy by whichever task needs them first; shard k drops what shards 0..k-1 hold, checked one
hash file at a time, so memory stays at one shard's hashes and no task waits for a barrier.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from hpcnlp.config import ConfigError, CorpusConfig, Problem
from hpcnlp.data.corpus import corpus_problems, expand_files, read_documents, split_points, splittable
from hpcnlp.runtime.io import atomic_dir, atomic_write_bytes, atomic_write_json, exclusive_lock

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # bump when the packing changes, so old prepared dirs are not reused
DOCS_PER_BATCH = 1000  # documents collected before tokenizing
# Characters per tokenizer call. Its Encodings cost ~100 bytes a token: unbounded, one batch of the
# kernel's register headers (multi-MB paragraphs of hex macros) took a task from 0.64 to 1.26 GB.
CALL_CHARS = 1 << 20


@dataclass
class Prepared:
    path: Path
    stats: dict | None  # None: this task's shards are done, the index is another task's
    reused: bool

    def load(self) -> dict:
        """{"train": Blocks in training order, "eval": Dataset}, both memory-mapped Arrow."""
        from datasets import concatenate_datasets

        shards = [_shard_dir(self.path, k) for k in range(self.stats["shards"])]
        train = concatenate_datasets([_arrow(s / "train.arrow") for s in shards])
        evals = [_arrow(s / "eval.arrow") for s in shards if (s / "eval.arrow").stat().st_size]
        return {"train": Blocks(train, self.path / "order.npy"), "eval": concatenate_datasets(evals)}


def _arrow(path: Path):
    from datasets import Dataset

    return Dataset.from_file(str(path))  # memory-mapped, nothing read into RAM


class Blocks:
    """The training blocks in the prepared order (a torch map-style dataset over memory-mapped Arrow).

    The Trainer reads it sequentially (ResumableTrainer): the order is the shuffle, so a resumed run
    skips seen batches by index alone, without reading them."""

    ordered = True

    def __init__(self, blocks, order_file: Path):
        import numpy as np

        self.blocks = blocks
        self.order = np.load(order_file, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.blocks[int(self.order[i])]


# ----------------------------------------------------------------------------------------------
# Fingerprint and plan: functions of the files and settings only (never of the task count)
# ----------------------------------------------------------------------------------------------
def _files_signature(files: list[str]) -> list[tuple[str, int, int]]:
    return [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]


def _tokenizer_signature(tokenizer) -> str:
    # The serialized fast tokenizer is the whole vocabulary + normalizer + pre-tokenizer. Its truncation
    # and padding are left out: per-call state (a tokenizer's first call clears them) that packing never
    # uses, which would otherwise give one tokenizer another fingerprint once it has been used.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def fingerprint(cfg: CorpusConfig, tokenizer, with_offsets: bool) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "sources": [
            {"name": s.name, "weight": s.weight, "files": _files_signature(expand_files(s.files, s.exclude))}
            for s in cfg.source_list()
        ],
        "eval": _files_signature(expand_files(cfg.eval_files)),
        "tokenizer": _tokenizer_signature(tokenizer),
        "with_offsets": with_offsets,
        **cfg.model_dump(
            exclude={"num_proc", "prepared_root", "train_files", "eval_files", "exclude", "sources", "max_eval_blocks"}
        ),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: CorpusConfig) -> list[dict]:
    """The shards: [{"source", "eval" (all its text held out), "pieces": [[path, start, end], ...]}]."""
    every = int(cfg.shard_mb * 2**20)
    boundary = b"\n\n" if cfg.sample_by == "paragraph" else b"\n"
    groups = [(s.name, False, expand_files(s.files, s.exclude)) for s in cfg.source_list()]
    if cfg.eval_files:
        groups.append(("eval", True, expand_files(cfg.eval_files)))
    shards = []
    for name, held_out, files in groups:
        pieces, size = [], 0
        for f in files:
            cuts = (
                split_points(f, every, boundary)
                if splittable(f, cfg.format, cfg.sample_by, cfg.encoding)
                else [0, os.path.getsize(f)]
            )
            for start, end in zip(cuts, cuts[1:]):
                pieces.append([f, start, None if len(cuts) == 2 else end])  # None: the whole file
                size += end - start
                if size >= every:
                    shards.append({"source": name, "eval": held_out, "pieces": pieces})
                    pieces, size = [], 0
        if pieces:
            shards.append({"source": name, "eval": held_out, "pieces": pieces})
    return shards


# ----------------------------------------------------------------------------------------------
# One shard: read, hash (dedup, eval split), tokenize, pack, write
# ----------------------------------------------------------------------------------------------
def _features(with_offsets: bool):
    from datasets import Features, Sequence, Value

    f = {"input_ids": Sequence(Value("int32")), "special_tokens_mask": Sequence(Value("int8"))}
    if with_offsets:
        f["offset_mapping"] = Sequence(Sequence(Value("int32"), length=2))
    return Features(f)


def _special_ids(tokenizer) -> tuple[int, int]:
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:  # RoBERTa-style tokenizers name them bos/eos
        cls_id, sep_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has neither cls/sep nor bos/eos tokens: cannot mark document ends")
    return cls_id, sep_id


class _Packer:
    """Concatenates tokenized documents and writes full blocks as they fill; the rest at `close`.

    The token stream is a numpy array and blocks go to Arrow as whole columns: per-token Python work
    cost as much as the tokenizer itself (profiled on an 8 MB kernel-source shard)."""

    def __init__(self, path: Path, tokenizer, block: int, with_offsets: bool):
        import numpy as np
        from datasets.arrow_writer import ArrowWriter

        self.writer = ArrowWriter(features=_features(with_offsets), path=str(path))
        # The Rust tokenizer itself: encode_batch_fast skips offsets when they are not needed (~1.3x).
        self.backend = tokenizer.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.body, self.with_offsets = block - 2, with_offsets
        self.cls_id, self.sep_id = _special_ids(tokenizer)
        self.stream = np.zeros(0, np.int32)
        self.offsets = np.zeros((0, 2), np.int32)
        self.blocks = self.tokens = 0

    def add(self, texts: list[str]) -> None:
        """Tokenize and pack documents, at most CALL_CHARS characters per tokenizer call."""
        call, size = [], 0
        for text in texts:
            pieces = _pieces(text)
            for i, piece in enumerate(pieces):
                call.append((piece, i == len(pieces) - 1))
                size += len(piece)
                if size >= CALL_CHARS:
                    self._encode(call)
                    call, size = [], 0
        self._encode(call)

    def _encode(self, call: list[tuple[str, bool]]) -> None:
        import numpy as np

        if not call:
            return
        encode = self.backend.encode_batch if self.with_offsets else self.backend.encode_batch_fast
        encs = encode([text for text, _ in call], add_special_tokens=False)
        sep = [self.sep_id]
        ids = [e.ids + sep if last else e.ids for e, (_, last) in zip(encs, call)]  # a document ends with [SEP]
        self.stream = np.concatenate([self.stream, np.fromiter(chain.from_iterable(ids), np.int32, sum(map(len, ids)))])
        if self.with_offsets:
            pairs = chain.from_iterable(
                chain.from_iterable(e.offsets + [(0, 0)] if last else e.offsets for e, (_, last) in zip(encs, call))
            )
            self.offsets = np.concatenate([self.offsets, np.fromiter(pairs, np.int32).reshape(-1, 2)])
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import numpy as np
        import pyarrow as pa

        body = self.body
        n = len(self.stream) if final else len(self.stream) // body * body
        if n == 0:
            return
        k, rest = divmod(n, body)  # k full blocks, then (final only) one shorter block
        ends = lambda a, v: np.full((k, 1) + a.shape[2:], v, a.dtype)  # noqa: E731
        full = self.stream[: k * body].reshape(k, body)
        ids = [np.hstack([ends(full, self.cls_id), full, ends(full, self.sep_id)]).ravel()]
        lengths = [body + 2] * k
        if rest:
            ids.append(np.concatenate([[self.cls_id], self.stream[k * body : n], [self.sep_id]]).astype(np.int32))
            lengths.append(rest + 2)
        ids = np.concatenate(ids)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        mask = (ids == self.sep_id).astype(np.int8)
        mask[starts[:-1]] = 1  # [CLS]; a [SEP] anywhere is 1 already
        table = {
            "input_ids": pa.ListArray.from_arrays(starts, ids),
            "special_tokens_mask": pa.ListArray.from_arrays(starts, mask),
        }
        if self.with_offsets:
            o = self.offsets[: k * body].reshape(k, body, 2)
            offs = [np.concatenate([ends(o, 0), o, ends(o, 0)], axis=1).reshape(-1, 2)]
            if rest:
                offs.append(
                    np.concatenate([np.zeros((1, 2), np.int32), self.offsets[k * body : n], np.zeros((1, 2), np.int32)])
                )
            table["offset_mapping"] = pa.ListArray.from_arrays(
                starts, pa.FixedSizeListArray.from_arrays(np.concatenate(offs).ravel(), 2)
            )
        self.tokens += int(sum(lengths))
        self.blocks += len(lengths)
        self.writer.write_table(pa.table(table))
        self.stream, self.offsets = self.stream[n:], self.offsets[n:]

    def close(self) -> dict:
        self._flush(final=True)
        self.writer.finalize()
        self.writer.close()
        return {"blocks": self.blocks, "tokens": self.tokens}


def _pieces(text: str) -> list[str]:
    """A document longer than CALL_CHARS in pieces cut just after a line end (else a space). BERT-style
    pre-tokenizers split at whitespace, so the tokens are the same as the whole document's; offsets
    count from each piece's start (a new word begins there, as after any line end)."""
    pieces = []
    while len(text) > CALL_CHARS:
        cut = max(text.rfind("\n", 0, CALL_CHARS), text.rfind(" ", 0, CALL_CHARS)) + 1 or CALL_CHARS
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text]


def _doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _held_out(h: bytes, cfg: CorpusConfig) -> bool:
    draw = hashlib.blake2b(h, digest_size=8, salt=str(cfg.seed).encode()[:16]).digest()
    return int.from_bytes(draw, "big") < cfg.eval_fraction * 2**64


CHECK_DOCS = 200_000  # `hpcnlp check` reads at most this many documents to decide the split (seconds)


def corpus_split_problems(data: CorpusConfig) -> list[Problem]:
    """corpus_problems, then (files there) whether the train/eval split leaves a document on each side:
    decided from the text's hashes before prepare writes a shard (split_problems)."""
    return corpus_problems(data) or split_problems(data, CHECK_DOCS)


def split_problems(cfg: CorpusConfig, max_docs: int | None = None) -> list[Problem]:
    """Whether the train/eval split leaves a document on each side, decided before anything is tokenized
    or written. Exact (the split is by content hash: _held_out), and quick: it stops once both sides have
    a document (a large corpus holds one out within ~1/eval_fraction documents). `max_docs` (`hpcnlp
    check`): stop undecided after that many; the job decides for good."""
    if cfg.eval_files and not _any_text(expand_files(cfg.eval_files), cfg, max_docs):
        return [
            Problem(
                key="data.eval_files",
                message=f"{cfg.eval_files} hold no non-empty document",
                fix="point it at files with text, or remove it to split off an eval set",
            )
        ]
    files = [f for s in cfg.source_list() for f in expand_files(s.files, s.exclude)]
    sides, read, nonempty = set(), 0, 0
    for doc in read_documents(files, cfg.format, cfg.text_field, cfg.sample_by, cfg.encoding):
        read += 1
        if doc["text"]:
            nonempty += 1
            sides.add(bool(not cfg.eval_files and _held_out(_doc_hash(doc["text"]), cfg)))
        if (False in sides and (True in sides or cfg.eval_files)) or (max_docs and read >= max_docs):
            return []
    if False not in sides:
        what = "sources" if cfg.sources else "train_files"
        return [
            Problem(
                key=f"data.{what}",
                message=f"{[s.files for s in cfg.source_list()]} hold no non-empty document ({read} read, "
                f"{read - nonempty} empty)",
                fix="point it at files with text (and check data.format, data.text_field)",
            )
        ]
    if cfg.eval_files:
        return []
    return [
        Problem(
            key="data.eval_fraction",
            message=f"no document was held out ({nonempty} non-empty documents, eval_fraction {cfg.eval_fraction})",
            fix="add text, raise data.eval_fraction, or give data.eval_files",
        )
    ]


def _any_text(files: list[str], cfg: CorpusConfig, max_docs: int | None) -> bool:
    for n, doc in enumerate(read_documents(files, cfg.format, cfg.text_field, cfg.sample_by, cfg.encoding), 1):
        if doc["text"] or (max_docs and n >= max_docs):
            return True
    return False


def _documents(shard: dict, cfg: CorpusConfig):
    return read_documents([tuple(p) for p in shard["pieces"]], cfg.format, cfg.text_field, cfg.sample_by, cfg.encoding)


def shard_hashes(final: Path, k: int, shard: dict, cfg: CorpusConfig):
    """64-bit hashes of shard k's non-empty documents, in order (hashes/<k>.npy, built on first use)."""
    import numpy as np

    path = final / "hashes" / f"{k:05d}.npy"
    with exclusive_lock(final / "locks" / f"hash-{k:05d}", holder_is=f"another hasher of shard {k}"):
        if not path.is_file():
            h = [int.from_bytes(_doc_hash(d["text"])[:8], "little") for d in _documents(shard, cfg) if d["text"]]
            buf = io.BytesIO()
            np.save(buf, np.array(h, np.uint64))
            atomic_write_bytes(path, buf.getvalue())
    return np.load(path)


def seen_before(final: Path, k: int, shards: list[dict], cfg: CorpusConfig):
    """For each non-empty document of shard k: is its text in an earlier shard? (one file at a time)"""
    import numpy as np

    mine = shard_hashes(final, k, shards[k], cfg)
    dup = np.zeros(len(mine), bool)
    for j in range(k):
        dup |= np.isin(mine, shard_hashes(final, j, shards[j], cfg))
    return dup


def build_shard(shard: dict, cfg: CorpusConfig, tokenizer, with_offsets: bool, dest: Path, earlier=None) -> dict:
    """Write one shard's train.arrow, eval.arrow and meta.json into dest (atomically).
    `earlier` (data.dedup): per non-empty document, True where an earlier shard has its text."""
    t0 = time.perf_counter()
    with atomic_dir(dest) as tmp:
        train = _Packer(tmp / "train.arrow", tokenizer, cfg.max_seq_length, with_offsets)
        held = _Packer(tmp / "eval.arrow", tokenizer, cfg.max_seq_length, with_offsets)
        meta = {
            "source": shard["source"],
            "documents_read": 0,
            "documents_empty_skipped": 0,
            "duplicates_removed": 0,
            "replaced_bytes": 0,
            "characters": 0,
            "documents_train": 0,
            "documents_eval": 0,
            "input_bytes": sum((e if e is not None else os.path.getsize(p)) - s for p, s, e in shard["pieces"]),
        }
        seen: set[bytes] = set()
        batch: dict[bool, list[str]] = {False: [], True: []}
        nonempty = -1
        for doc in _documents(shard, cfg):
            meta["documents_read"] += 1
            meta["replaced_bytes"] += doc["replaced_bytes"]
            text = doc["text"]
            if not text:
                meta["documents_empty_skipped"] += 1
                continue
            nonempty += 1
            h = _doc_hash(text)
            if cfg.dedup:
                if h in seen or (earlier is not None and earlier[nonempty]):
                    meta["duplicates_removed"] += 1
                    continue
                seen.add(h)
            side = shard["eval"] or (not cfg.eval_files and _held_out(h, cfg))
            meta["documents_eval" if side else "documents_train"] += 1
            meta["characters"] += len(text)
            batch[side].append(text)
            if len(batch[side]) >= DOCS_PER_BATCH:
                (held if side else train).add(batch[side])
                batch[side] = []
        train.add(batch[False])
        held.add(batch[True])
        for name, packer in (("train", train), ("eval", held)):
            for k, v in packer.close().items():
                meta[f"{k}_{name}"] = v
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


# ----------------------------------------------------------------------------------------------
# Tasks and the index
# ----------------------------------------------------------------------------------------------
def _shard_dir(final: Path, k: int) -> Path:
    return final / "shards" / f"{k:05d}"


_WORK: list = []  # this task's shards; set before forking, so workers get them without pickling


def _work(i: int) -> int:
    k, shards, cfg, tokenizer, with_offsets, final = _WORK[i]
    dest = _shard_dir(final, k)
    # A concurrent preparer of this fingerprint may be on the same shard: one builds, the other reuses.
    with exclusive_lock(final / "locks" / f"{k:05d}", holder_is=f"another preparer of shard {k}"):
        if (dest / "meta.json").is_file():
            return 0
        try:
            earlier = seen_before(final, k, shards, cfg) if cfg.dedup else None
            build_shard(shards[k], cfg, tokenizer, with_offsets, dest, earlier=earlier)
        except OSError:
            # The shard appeared while we built it (FileExistsError, or ENOTEMPTY from the rename): a
            # preparer that could not lock (filesystem without flock) finished it first. Same bytes: use it.
            if (dest / "meta.json").is_file():
                return 0
            raise
        return 1


def find(cfg: CorpusConfig, tokenizer, with_offsets: bool = False) -> Prepared | None:
    """The complete prepared data of `cfg`, or None (nothing is built)."""
    return _reuse(Path(cfg.prepared_root) / fingerprint(cfg, tokenizer, with_offsets))


def prepare(cfg: CorpusConfig, tokenizer, with_offsets: bool = False, task: tuple[int, int] = (0, 1)) -> Prepared:
    """Tokenize + pack `cfg`'s corpus, or find the identical earlier result.

    `task` = (index, count): this process builds shards index, index+count, ... with data.num_proc
    local processes; the one that finds all shards done writes the index."""
    fp = fingerprint(cfg, tokenizer, with_offsets)
    final = Path(cfg.prepared_root) / fp
    if done := _reuse(final):
        return done
    problems = split_problems(cfg)  # before any shard is written: a corpus too small to split is refused now
    if problems:
        raise ConfigError("prepare", problems)
    shards = plan(cfg)
    final.mkdir(parents=True, exist_ok=True)
    index, count = task
    mine = [(k, shards, cfg, tokenizer, with_offsets, final) for k in range(len(shards)) if k % count == index]
    t0 = time.perf_counter()
    built = _run(mine, cfg.num_proc)
    log.info(
        "prepare: task %d/%d built %d of its %d shards (of %d) in %.1fs",
        index,
        count,
        built,
        len(mine),
        len(shards),
        time.perf_counter() - t0,
    )
    missing = [k for k in range(len(shards)) if not (_shard_dir(final, k) / "meta.json").is_file()]
    if missing:  # other tasks' shards: the last task to finish writes the index
        return Prepared(final, None, reused=False)
    with exclusive_lock(final / "locks" / "index", holder_is=f"another preparer of {final}"):
        result = _reuse(final) or _index(cfg, shards, final, fp)
    result.reused = built == 0  # whoever wrote the index: this call built nothing
    return result


def _run(work: list, num_proc: int) -> int:
    _WORK[:] = [w for w in work if not (_shard_dir(w[5], w[0]) / "meta.json").is_file()]
    if num_proc <= 1 or len(_WORK) <= 1:
        return sum(_work(i) for i in range(len(_WORK)))
    # fork: workers inherit the loaded tokenizer. Fast tokenizers must not use their own threads
    # across a fork; one process per core is the parallelism here. A fresh process per shard keeps
    # each worker's memory at one shard's.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("fork").Pool(min(num_proc, len(_WORK)), maxtasksperchild=1) as pool:
        return sum(pool.imap_unordered(_work, range(len(_WORK))))


def _reuse(final: Path) -> Prepared | None:
    if not (final / "stats.json").is_file():  # written last: its presence means complete
        return None
    stats = json.loads((final / "stats.json").read_text())
    log.info("prepare: reusing %s (%s blocks)", final, stats["blocks"])
    return Prepared(final, stats, reused=True)


def _too_few(key: str, message: str, fix: str) -> ConfigError:
    # A corpus without enough text is a config problem: one line and exit 2, not a traceback.
    return ConfigError("prepare", [Problem(key=key, message=message, fix=fix)])


def _index(cfg: CorpusConfig, shards: list[dict], final: Path, fp: str) -> Prepared:
    import numpy as np

    metas = [json.loads((_shard_dir(final, k) / "meta.json").read_text()) for k in range(len(shards))]
    stats = _sum_stats(cfg, metas)
    if stats["documents_train"] == 0:
        what = "sources" if cfg.sources else "train_files"
        raise _too_few(
            f"data.{what}",
            f"{[s.files for s in cfg.source_list()]} hold no non-empty "
            f"document ({stats['documents_read']} read, {stats['documents_empty_skipped']} empty)",
            "point it at files with text (and check data.format, data.text_field)",
        )
    if stats["documents_eval"] == 0:
        if cfg.eval_files:
            raise _too_few(
                "data.eval_files",
                f"{cfg.eval_files} hold no non-empty document",
                "point it at files with text, or remove it to split off an eval set",
            )
        raise _too_few(
            "data.eval_fraction",
            f"no document was held out ({stats['documents_train']} non-empty "
            f"documents, eval_fraction {cfg.eval_fraction})",
            "add text, raise data.eval_fraction, or give data.eval_files",
        )
    order, realized = training_order(cfg, [(m["source"], m["blocks_train"]) for m in metas])
    for name, share in realized.items():
        stats["sources"][name].update(blocks_in_order=share[0], share_realized=round(share[1], 6))
    stats["blocks_in_order"] = len(order)
    buf = io.BytesIO()
    np.save(buf, order)
    atomic_write_bytes(final / "order.npy", buf.getvalue())
    stats.update(fingerprint=fp, max_seq_length=cfg.max_seq_length, shards=len(shards), mix=cfg.mix)
    for stale in (final / "shards").glob(".tmp-*"):  # builds of killed tasks (every shard is done now)
        shutil.rmtree(stale, ignore_errors=True)
    atomic_write_json(final / "stats.json", stats)  # written last: its presence means complete
    log.info("prepare: %s", summary(stats))
    return Prepared(final, stats, reused=False)


def _sum_stats(cfg: CorpusConfig, metas: list[dict]) -> dict:
    keys = [
        "documents_read",
        "documents_empty_skipped",
        "duplicates_removed",
        "replaced_bytes",
        "characters",
        "documents_train",
        "documents_eval",
        "blocks_train",
        "blocks_eval",
        "tokens_train",
        "tokens_eval",
        "input_bytes",
    ]
    total = dict.fromkeys(keys, 0)
    weights = {s.name: s.weight for s in cfg.source_list()}
    per = {name: {**dict.fromkeys(keys, 0), "weight": w} for name, w in weights.items()}
    for m in metas:
        for k in keys:
            total[k] += m[k]
            if m["source"] in per:
                per[m["source"]][k] += m[k]
    total["blocks"] = total["blocks_train"] + total["blocks_eval"]
    total["tokens"] = total["tokens_train"] + total["tokens_eval"]
    total["padding_tokens"] = total["blocks"] * cfg.max_seq_length - total["tokens"]
    total["padding_share"] = round(total["padding_tokens"] / max(total["blocks"] * cfg.max_seq_length, 1), 5)
    wsum = sum(weights.values())
    for p in per.values():
        p["share_asked"] = round(p["weight"] / wsum, 6) if cfg.mix == "weighted" else None
    total["sources"] = per
    total["tokens_per_second_per_task"] = round(total["tokens"] / max(sum(m["seconds"] for m in metas), 1e-9), 1)
    return total


def training_order(cfg: CorpusConfig, shard_blocks: list[tuple[str, int]]):
    """Global train-block indices in training order, and {source: (blocks, realized share)}.

    weighted: each source's blocks, shuffled, repeated or cut to weight/sum(weights) of all train blocks,
    then all shuffled together; curriculum: each source's blocks shuffled, sources in listed order."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    ranges: dict[str, list[np.ndarray]] = {s.name: [] for s in cfg.source_list()}
    at = 0
    for name, n in shard_blocks:
        if name in ranges:
            ranges[name].append(np.arange(at, at + n, dtype=np.int64))
        at += n
    blocks = {name: np.concatenate(r) if r else np.zeros(0, np.int64) for name, r in ranges.items()}
    total = sum(len(b) for b in blocks.values())
    if cfg.mix == "curriculum":
        parts = {name: rng.permutation(b) for name, b in blocks.items()}
    else:
        wsum = sum(s.weight for s in cfg.source_list())
        parts = {}
        for s in cfg.source_list():
            b, want = blocks[s.name], round(total * s.weight / wsum)
            if len(b):
                parts[s.name] = np.concatenate([rng.permutation(b) for _ in range(-(-want // len(b)))])[:want]
    order = np.concatenate(list(parts.values())) if parts else np.zeros(0, np.int64)
    if cfg.mix == "weighted":
        order = rng.permutation(order)
    realized = {name: (len(p), len(p) / max(len(order), 1)) for name, p in parts.items()}
    return order.astype(np.uint32 if at < 2**32 else np.int64), realized


def summary(s: dict) -> str:
    mixed = ", ".join(f"{n} {v.get('share_realized', 0):.1%}" for n, v in s["sources"].items())
    return (
        f"{s['documents_train']}+{s['documents_eval']} documents (train+eval), "
        f"{s['documents_empty_skipped']} empty skipped, {s['duplicates_removed']} duplicates removed, "
        f"{s['replaced_bytes']} undecodable bytes replaced, "
        f"{s['tokens']:,} tokens in {s['blocks']:,} blocks of {s['max_seq_length']} in {s['shards']} shard(s), "
        f"padding {100 * s['padding_share']:.2f}%, {s['tokens_per_second_per_task']:,.0f} tokens/s per task"
        + (f"; training order: {mixed}" if len(s["sources"]) > 1 else "")
    )
