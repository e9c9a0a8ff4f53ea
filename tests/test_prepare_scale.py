"""Sharded prepare: compressed inputs, byte-range splits, N-independent bytes, mixing, curriculum,
dedup, redoing a failed task's shards alone, data_from, and pretrain's refusal to tokenize in a group."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from hpcnlp.config import ConfigError, CorpusConfig
from hpcnlp.data import pack
from hpcnlp.data.corpus import expand_files, read_documents, split_points

TIMING = {"seconds", "tokens_per_second_per_task"}


def _cfg(root: Path, **kw) -> CorpusConfig:
    return CorpusConfig(prepared_root=str(root), **kw)


def _bytes(path: Path) -> dict[str, bytes]:
    """Every data file of a prepared dir (meta.json less its timing): what must not depend on N."""
    out = {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.arrow"))}
    out["order.npy"] = (path / "order.npy").read_bytes()
    for f in sorted(path.rglob("meta.json")):
        out[str(f.relative_to(path))] = {k: v for k, v in json.loads(f.read_text()).items() if k not in TIMING}
    out["stats.json"] = {k: v for k, v in json.loads((path / "stats.json").read_text()).items() if k not in TIMING}
    return out


@pytest.fixture
def many_shards(small_corpus) -> dict:
    """The 4 doc files as 2 sources, ~8 KB shards: the big files are cut by byte range."""
    files = sorted(str(f) for f in small_corpus.glob("*.rst.txt"))
    return {
        "sources": [{"name": "a", "files": files[:2]}, {"name": "b", "files": files[2:]}],
        "max_seq_length": 32,
        "shard_mb": 0.008,
        "eval_fraction": 0.1,
    }


def test_compressed_inputs_read_as_the_plain_file(tmp_path, small_corpus):
    import zstandard

    src = small_corpus / "introduction.rst.txt"
    raw = src.read_bytes()
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "x.txt.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "x.txt.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "x.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    lines = [json.dumps({"text": t}) for t in ("one doc", "two doc")]
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    plain = [d["text"] for d in read_documents([str(src)])]
    assert len(plain) > 20
    for suffix in ("gz", "bz2", "xz", "zst"):
        assert [d["text"] for d in read_documents([str(tmp_path / f"x.txt.{suffix}")])] == plain, suffix
    assert [d["text"] for d in read_documents([str(tmp_path / "y.jsonl.gz")])] == ["one doc", "two doc"]


@pytest.mark.parametrize("sample_by,boundary", [("paragraph", b"\n\n"), ("line", b"\n")])
def test_byte_ranges_cut_at_boundaries_read_the_same_documents(small_corpus, sample_by, boundary):
    f = str(small_corpus / "controlflow.rst.txt")
    cuts = split_points(f, 4096, boundary)
    assert len(cuts) > 5 and cuts[-1] == Path(f).stat().st_size
    whole = [d["text"] for d in read_documents([f], sample_by=sample_by)]
    pieces = [d["text"] for d in read_documents([(f, a, b) for a, b in zip(cuts, cuts[1:])], sample_by=sample_by)]
    assert [t for t in pieces if t] == [t for t in whole if t]


def test_include_exclude_globs(tmp_path):
    for name in ("a/x.c", "a/x.h", "a/Documentation/y.rst", "b/z.c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    got = expand_files([str(tmp_path / "**/*.c"), str(tmp_path / "**/*.rst")], exclude=["*/Documentation/*"])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in got] == ["a/x.c", "b/z.c"]


def test_same_bytes_for_1_and_3_tasks_and_2_processes(tmp_path, many_shards, minilm_tokenizer):
    one = pack.prepare(_cfg(tmp_path / "one", **many_shards), minilm_tokenizer)
    assert one.stats["shards"] >= 6  # the plan cut the corpus into many shards
    results = [pack.prepare(_cfg(tmp_path / "three", **many_shards), minilm_tokenizer, task=(t, 3)) for t in range(3)]
    assert [r.stats is None for r in results] == [True, True, False]  # the last task wrote the index
    procs = pack.prepare(_cfg(tmp_path / "procs", **many_shards, num_proc=2), minilm_tokenizer)
    assert one.path.name == results[-1].path.name == procs.path.name  # fingerprint independent of N
    assert _bytes(one.path) == _bytes(results[-1].path) == _bytes(procs.path)
    data = one.load()  # memory-mapped shards behind the order
    assert len(data["train"]) == one.stats["blocks_in_order"] and len(data["eval"]) == one.stats["blocks_eval"]
    assert data["train"][0]["input_ids"][0] == minilm_tokenizer.cls_token_id


def _source_of(order: np.ndarray, stats_dir: Path) -> np.ndarray:
    """Source name per training block of `order`, from the shards' metadata."""
    names = []
    for meta in sorted(stats_dir.glob("shards/*/meta.json")):
        m = json.loads(meta.read_text())
        names += [m["source"]] * m["blocks_train"]
    return np.array(names)[order]


def test_weighted_mix_within_1_percent(tmp_path, small_corpus, minilm_tokenizer):
    files = sorted(str(f) for f in small_corpus.glob("*.rst.txt"))
    cfg = _cfg(
        tmp_path,
        sources=[{"name": "small", "files": files[:1], "weight": 3}, {"name": "rest", "files": files[1:], "weight": 1}],
        max_seq_length=8,
    )
    p = pack.prepare(cfg, minilm_tokenizer)
    order = np.load(p.path / "order.npy")
    assert len(order) > 3000
    sources = _source_of(order, p.path)
    share = float(np.mean(sources == "small"))
    assert abs(share - 0.75) < 0.01 and p.stats["sources"]["small"]["share_realized"] == pytest.approx(share)
    # The small source is repeated to reach its weight, and the two are interleaved, not in runs.
    assert p.stats["sources"]["small"]["blocks_in_order"] > p.stats["sources"]["small"]["blocks_train"]
    assert 0.6 < np.mean(sources[:400] == "small") < 0.9
    assert p.stats["sources"]["rest"]["tokens_train"] > 0 and "small" in pack.summary(p.stats)


def test_curriculum_order(tmp_path, many_shards, minilm_tokenizer):
    p = pack.prepare(_cfg(tmp_path, **many_shards, mix="curriculum"), minilm_tokenizer)
    sources = _source_of(np.load(p.path / "order.npy"), p.path)
    n_a = p.stats["sources"]["a"]["blocks_train"]
    assert list(sources[:n_a]) == ["a"] * n_a and set(sources[n_a:]) == {"b"}
    assert len(sources) == p.stats["blocks_train"]  # every block once
    assert not np.all(np.diff(np.load(p.path / "order.npy")[:n_a].astype(int)) == 1)  # shuffled within a source


def test_dedup_counts(tmp_path, minilm_tokenizer):
    paras = [f"paragraph number {i} with some words" for i in range(40)]
    text = "\n\n".join(paras + paras[:10] + paras[:5])  # 15 repeats
    (tmp_path / "d.txt").write_text(text)
    base = dict(train_files=[str(tmp_path / "d.txt")], max_seq_length=32, eval_fraction=0.2)
    kept = pack.prepare(_cfg(tmp_path / "p", **base), minilm_tokenizer).stats
    deduped = pack.prepare(_cfg(tmp_path / "p", **base, dedup=True), minilm_tokenizer).stats
    assert kept["duplicates_removed"] == 0 and kept["documents_train"] + kept["documents_eval"] == 55
    assert deduped["duplicates_removed"] == 15 and deduped["documents_train"] + deduped["documents_eval"] == 40
    assert deduped["sources"]["train"]["duplicates_removed"] == 15


def test_a_failed_task_is_redone_alone(tmp_path, many_shards, minilm_tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, **many_shards)
    real, built = pack.build_shard, []

    def dies_on_shard_10(shard, *args, **kw):  # the last of task 1's shards (1, 4, 7, 10)
        if args[-1].name == "00010":
            raise MemoryError("killed")
        built.append(args[-1].name)
        return real(shard, *args, **kw)

    monkeypatch.setattr(pack, "build_shard", dies_on_shard_10)
    with pytest.raises(MemoryError):
        pack.prepare(cfg, minilm_tokenizer, task=(1, 3))
    for t in (0, 2):
        assert pack.prepare(cfg, minilm_tokenizer, task=(t, 3)).stats is None  # shard 10 still missing
    done = {d.name: d.stat().st_mtime_ns for d in tmp_path.glob("*/shards/*")}
    assert len(done) == 10 and "00010" not in done and not list(tmp_path.rglob(".tmp-*"))
    built.clear()
    monkeypatch.setattr(
        pack, "build_shard", lambda shard, *a, **kw: (built.append(a[-1].name), real(shard, *a, **kw))[1]
    )
    again = pack.prepare(cfg, minilm_tokenizer, task=(1, 3))  # the requeued task
    assert again.stats is not None and again.stats["shards"] == 11 and built == ["00010"]
    assert {d.name: d.stat().st_mtime_ns for d in tmp_path.glob("*/shards/*") if d.name != "00010"} == done
    clean = pack.prepare(_cfg(tmp_path / "clean", **many_shards), minilm_tokenizer)
    assert _bytes(clean.path) == _bytes(again.path)


def test_data_from_takes_the_pretrain_data_section(tmp_path, pretrain_config):
    import yaml

    from hpcnlp.jobs import load_config

    path, cfg = pretrain_config
    prep = tmp_path / "prep.yaml"
    prep.write_text(yaml.safe_dump({"job": "prepare", "data_from": str(path), "data": {"num_proc": 2}}))
    got = load_config(prep)
    assert got.data.model_dump(exclude={"num_proc"}) == load_config(path).data.model_dump(exclude={"num_proc"})
    assert got.data.num_proc == 2 and got.model_name_or_path == cfg["model_name_or_path"]
    prep.write_text(yaml.safe_dump({"job": "prepare", "data_from": str(prep)}))
    with pytest.raises(ConfigError, match="data_from: .* is not a pretrain config"):
        load_config(prep)


def test_a_process_group_never_tokenizes(tmp_path, pretrain_config, minilm_tokenizer):
    from hpcnlp.jobs import load_config
    from hpcnlp.jobs.pretrain import prepared_data

    path, _ = pretrain_config
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="data: no prepared data .* 2-process run does not tokenize.*prepare"):
        prepared_data(cfg, minilm_tokenizer, world_size=2)
    assert not list(tmp_path.rglob("meta.json"))  # nothing was built
    made = prepared_data(cfg, minilm_tokenizer, world_size=1)  # one process: prepares (the demo's one command)
    assert prepared_data(cfg, minilm_tokenizer, world_size=2).path == made.path


def test_dedup_across_shards_first_copy_kept_for_any_task_count(tmp_path, minilm_tokenizer):
    # 3 files of ~1 KB, 1 KB shards: a repeat in another file is a repeat in another shard.
    paras = [f"paragraph number {i} with some words to make it longer than a line" for i in range(60)]
    files = []
    for i, chunk in enumerate((paras[:20], paras[20:40] + paras[:7], paras[40:] + paras[:3] + paras[25:30])):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text("\n\n".join(chunk))
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n\n".join([paras[0], "a held-out text seen nowhere else", paras[59]]))
    base = dict(
        train_files=[str(f) for f in files], eval_files=[str(eval_file)], max_seq_length=32, shard_mb=0.001, dedup=True
    )
    one = pack.prepare(_cfg(tmp_path / "one", **base), minilm_tokenizer)
    assert one.stats["shards"] >= 4
    assert one.stats["duplicates_removed"] == 7 + 3 + 5 + 2  # 15 train repeats + 2 eval texts seen in train
    assert one.stats["documents_train"] == 60 and one.stats["documents_eval"] == 1
    three = tmp_path / "three"
    for i in (2, 0, 1):
        pack.prepare(_cfg(three, **base), minilm_tokenizer, task=(i, 3))
    assert _bytes(one.path) == _bytes(next(three.iterdir()))
    # Each text once: the training token stream, decoded, is every paragraph exactly once.
    stream = [t for b in one.load()["train"].blocks for t in b["input_ids"][1:-1]]
    docs = [d.strip() for d in minilm_tokenizer.decode(stream).split("[SEP]") if d.strip()]
    assert sorted(docs) == sorted(p.lower() for p in paras)


def test_long_documents_are_tokenized_in_bounded_calls_with_the_same_tokens(
    tmp_path, small_corpus, minilm_tokenizer, monkeypatch
):
    # A task's memory follows the characters per tokenizer call (its Encodings cost ~100 bytes a token),
    # so long documents go in line-aligned pieces; WordPiece splits at whitespace: the same tokens.
    base = dict(
        train_files=[str(small_corpus / "*.rst.txt")],
        max_seq_length=32,
        eval_files=[str(small_corpus / "general.rst.txt")],
    )
    whole = pack.prepare(_cfg(tmp_path / "whole", **base), minilm_tokenizer, with_offsets=True)
    monkeypatch.setattr(pack, "CALL_CHARS", 300)  # every document is many calls
    assert len(pack._pieces("x\n" * 1000)) >= 6 and "".join(pack._pieces("x\n" * 1000)) == "x\n" * 1000
    cut = pack.prepare(_cfg(tmp_path / "cut", **base), minilm_tokenizer, with_offsets=True)
    a, b = whole.load()["train"].blocks, cut.load()["train"].blocks
    assert a["input_ids"] == b["input_ids"] and a["special_tokens_mask"] == b["special_tokens_mask"]
    assert a["offset_mapping"] != b["offset_mapping"]  # offsets count from each piece's start (after a line end)
