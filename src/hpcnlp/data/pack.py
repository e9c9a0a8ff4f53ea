"""`hpcnlp prepare`: tokenize a corpus once, pack it into fixed-length blocks, save it memory-mapped.

Packing: each document's tokens are followed by the separator token, documents are concatenated,
and the stream is cut into blocks of max_seq_length (with [CLS] ... [SEP] around each block).
So no block is padded but the very last of each map batch, and two documents never touch without
a separator between them. The eval split is drawn by document, before packing, so no document
is on both sides.

The result lives in <prepared_root>/<fingerprint>/ where the fingerprint hashes everything that
changes the result (files with sizes and mtimes, tokenizer, settings). A second run with the same
inputs finds it and returns at once; an interrupted run leaves only a .tmp-* dir. Concurrent runs
of one fingerprint take turns on <prepared_root>/.<fingerprint>.lock: one builds, the others reuse.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hpcnlp.config import ConfigError, CorpusConfig, Problem
from hpcnlp.data.corpus import expand_files, read_documents
from hpcnlp.runtime.io import atomic_dir, atomic_write_json, exclusive_lock

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the packing changes, so old prepared dirs are not reused


@dataclass
class Prepared:
    path: Path
    stats: dict
    reused: bool

    def load(self):
        from datasets import load_from_disk

        return load_from_disk(str(self.path / "dataset"))  # memory-mapped Arrow


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
        "train": _files_signature(expand_files(cfg.train_files)),
        "eval": _files_signature(expand_files(cfg.eval_files)),
        "tokenizer": _tokenizer_signature(tokenizer),
        "with_offsets": with_offsets,
        **cfg.model_dump(exclude={"num_proc", "prepared_root", "train_files", "eval_files"}),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(files: list[str], cfg: CorpusConfig, cache_dir: str):
    from datasets import Dataset

    return Dataset.from_generator(
        read_documents,
        # datasets splits the `files` list between the num_proc workers.
        gen_kwargs={"files": files, "fmt": cfg.format, "text_field": cfg.text_field,
                    "sample_by": cfg.sample_by, "encoding": cfg.encoding},
        num_proc=min(cfg.num_proc, len(files)) if cfg.num_proc > 1 else None,
        cache_dir=cache_dir,
    )


def _packer(tokenizer, block: int, with_offsets: bool):
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:  # RoBERTa-style tokenizers name them bos/eos
        cls_id, sep_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has neither cls/sep nor bos/eos tokens: cannot mark document ends")
    body = block - 2

    def pack(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, return_offsets_mapping=with_offsets, verbose=False)
        stream: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ids in enumerate(enc["input_ids"]):
            stream.extend(ids)
            stream.append(sep_id)
            if with_offsets:
                offsets.extend(enc["offset_mapping"][i])
                offsets.append((0, 0))
        out: dict[str, list] = {"input_ids": [], "special_tokens_mask": []}
        if with_offsets:
            out["offset_mapping"] = []
        for start in range(0, len(stream), body):
            chunk = stream[start:start + body]
            out["input_ids"].append([cls_id, *chunk, sep_id])
            out["special_tokens_mask"].append([1, *(int(t == sep_id) for t in chunk), 1])
            if with_offsets:
                out["offset_mapping"].append([(0, 0), *offsets[start:start + body], (0, 0)])
        return out

    return pack


def prepare(cfg: CorpusConfig, tokenizer, with_offsets: bool = False) -> Prepared:
    """Tokenize + pack `cfg`'s corpus, or find the identical earlier result."""
    fp = fingerprint(cfg, tokenizer, with_offsets)
    final = Path(cfg.prepared_root) / fp
    if done := _reuse(final):
        return done
    # Several processes may prepare one fingerprint at once (array tasks, jobs on a fresh prepared_root):
    # the first to lock builds; the others wait here, then find its result. The lock file's name starts
    # with a dot and it holds no stats.json, so it is never taken for a result.
    with exclusive_lock(final.with_name(f".{fp}.lock"), holder_is=f"another preparer of {final}"):
        return _reuse(final) or _build(cfg, tokenizer, with_offsets, fp, final)


def _reuse(final: Path) -> Prepared | None:
    if not (final / "stats.json").is_file():  # written last: its presence means complete
        return None
    stats = json.loads((final / "stats.json").read_text())
    log.info("prepare: reusing %s (%s blocks)", final, stats["blocks"])
    return Prepared(final, stats, reused=True)


def _too_few(key: str, message: str, fix: str) -> ConfigError:
    # A corpus without enough text is a config problem: one line and exit 2, not a traceback.
    return ConfigError("prepare", [Problem(key=key, message=message, fix=fix)])


def _build(cfg: CorpusConfig, tokenizer, with_offsets: bool, fp: str, final: Path) -> Prepared:
    from datasets import DatasetDict

    t0 = time.perf_counter()
    train_files, eval_files = expand_files(cfg.train_files), expand_files(cfg.eval_files)
    try:
        with atomic_dir(final) as tmp:
            # Every intermediate Arrow file lives in tmp/cache (fresh per build, so never stale) and is
            # deleted at the end; only the packed dataset and stats.json are kept.
            cache = str(tmp / "cache")
            docs = _read(train_files, cfg, cache)
            stats = _doc_stats(docs)
            docs = docs.filter(_nonempty, batched=True, num_proc=_np(cfg))
            if len(docs) == 0:
                raise _too_few("data.train_files", f"{cfg.train_files} hold no non-empty document "
                               f"({stats['documents_read']} read, all empty)",
                               "point it at files with text (and check data.format, data.text_field)")
            if eval_files:
                held = _read(eval_files, cfg, cache)
                for k, v in _doc_stats(held).items():
                    stats[k] += v
                held = held.filter(_nonempty, batched=True)
                if len(held) == 0:
                    raise _too_few("data.eval_files", f"{cfg.eval_files} hold no non-empty document",
                                   "point it at files with text, or remove it to split off an eval set")
                split = DatasetDict(train=docs, eval=held)
            else:
                if len(docs) < 2:
                    raise _too_few("data.train_files", f"{cfg.train_files} hold only {len(docs)} non-empty "
                                   "document; need at least 2 to split off an eval set",
                                   "add text or give data.eval_files")
                split = docs.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
                split = DatasetDict(train=split["train"], eval=split["test"])
            stats["documents_train"], stats["documents_eval"] = len(split["train"]), len(split["eval"])
            packed = split.map(_packer(tokenizer, cfg.max_seq_length, with_offsets), batched=True,
                               batch_size=2000, remove_columns=split["train"].column_names, num_proc=_np(cfg),
                               desc="tokenize+pack")
            packed.save_to_disk(str(tmp / "dataset"))
            stats.update(_block_stats(packed, cfg.max_seq_length))
            seconds = time.perf_counter() - t0
            stats.update(seconds=round(seconds, 2), tokens_per_second=round(stats["tokens"] / max(seconds, 1e-9), 1),
                         fingerprint=fp, max_seq_length=cfg.max_seq_length, num_proc=cfg.num_proc,
                         train_files=len(train_files), eval_files=len(eval_files))
            shutil.rmtree(cache, ignore_errors=True)
            atomic_write_json(tmp / "stats.json", stats)  # written last: its presence means complete
    except OSError:
        # The final dir appeared while we built (FileExistsError, or ENOTEMPTY from the rename): a preparer
        # that could not lock (filesystem without flock) finished first. Its result equals ours, which
        # atomic_dir has already removed, so use it rather than fail after all that work.
        if done := _reuse(final):
            return done
        raise
    log.info("prepare: %s", summary(stats))
    return Prepared(final, stats, reused=False)


def _nonempty(batch) -> list[bool]:
    return [bool(t) for t in batch["text"]]


def _np(cfg: CorpusConfig) -> int | None:
    return cfg.num_proc if cfg.num_proc > 1 else None


def _doc_stats(docs) -> dict:
    import pyarrow.compute as pc

    table = docs.data.table
    lengths = pc.utf8_length(table.column("text"))
    empty = int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
    return {"documents_read": len(docs), "documents_empty_skipped": empty,
            "replaced_bytes": int(pc.sum(table.column("replaced_bytes")).as_py() or 0),
            "characters": int(pc.sum(lengths).as_py() or 0)}


def _block_stats(packed, block: int) -> dict:
    import pyarrow.compute as pc

    out = {"tokens": 0, "blocks": 0, "padding_tokens": 0}
    for name, ds in packed.items():
        lengths = pc.list_value_length(ds.data.table.column("input_ids"))
        n, tokens = len(ds), int(pc.sum(lengths).as_py() or 0)
        out[f"blocks_{name}"], out[f"tokens_{name}"] = n, tokens
        out["blocks"] += n
        out["tokens"] += tokens
        out["padding_tokens"] += n * block - tokens  # short last blocks are padded at batch time
    out["padding_share"] = round(out["padding_tokens"] / max(out["blocks"] * block, 1), 5)
    return out


def summary(s: dict) -> str:
    return (f"{s['documents_train']}+{s['documents_eval']} documents (train+eval), "
            f"{s['documents_empty_skipped']} empty skipped, {s['replaced_bytes']} undecodable bytes replaced, "
            f"{s['tokens']:,} tokens in {s['blocks']:,} blocks of {s['max_seq_length']}, "
            f"padding {100 * s['padding_share']:.2f}%, {s['tokens_per_second']:,.0f} tokens/s")
