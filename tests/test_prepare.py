"""Corpus reading and tokenize+pack: formats, edge cases, reuse by fingerprint, atomicity."""

from __future__ import annotations

import json

import pytest

from hpcnlp.config import CorpusConfig
from hpcnlp.data.corpus import expand_files, read_documents
from hpcnlp.data.pack import prepare


def _cfg(tmp_path, files, **kw) -> CorpusConfig:
    return CorpusConfig(train_files=files, prepared_root=str(tmp_path / "prepared"), **kw)


def test_formats_globs_dirs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"text": ""}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", None]}), tmp_path / "c.parquet")
    files = expand_files([str(tmp_path / "d"), str(tmp_path / "*.jsonl")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["b.jsonl", "a.txt"]  # sorted by full path
    docs = [d["text"] for d in read_documents(files)]
    assert docs == ["json doc", "", "first para\nstill first", "second para"]
    assert [d["text"] for d in read_documents([str(tmp_path / "c.parquet")], text_field="body")] == ["parquet one", ""]
    lines = [d["text"] for d in read_documents([str(tmp_path / "d" / "a.txt")], sample_by="line")]
    assert lines == ["first para", "still first", "", "second para"]


def test_jsonl_errors_name_file_line_and_fix(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: no field 'text'.*data.text_field"):
        list(read_documents([str(bad)]))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ol\xe9\n\nplain text here\n".encode("latin-1"))
    docs = list(read_documents([str(f)]))
    assert sum(d["replaced_bytes"] for d in docs) == 2
    assert docs[0]["text"] == "caf\ufffd ol\ufffd"


def test_prepare_packs_without_fusing_documents(tmp_path, small_corpus, minilm_tokenizer):
    p = prepare(_cfg(tmp_path, [str(small_corpus / "*.rst.txt")], max_seq_length=64), minilm_tokenizer)
    ds = p.load()
    s = p.stats
    assert not p.reused and s["blocks"] == len(ds["train"]) + len(ds["eval"]) and s["documents_eval"] > 0
    assert s["padding_share"] < 0.02  # packing, not padding
    lengths = [len(x) for x in ds["train"].blocks["input_ids"]]
    assert max(lengths) == 64 and sum(n == 64 for n in lengths) >= len(lengths) - 1
    tok = minilm_tokenizer
    row = ds["train"][0]["input_ids"]
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    # Total [SEP] count = one per document (+ one closing each block): documents are never fused.
    seps = sum(ids.count(tok.sep_token_id) for ids in ds["train"].blocks["input_ids"])
    assert seps >= s["documents_train"]
    assert json.loads((p.path / "stats.json").read_text())["tokens"] == s["tokens"]


def test_prepare_reuses_and_rebuilds_on_change(tmp_path, small_corpus, minilm_tokenizer):
    cfg = _cfg(tmp_path, [str(small_corpus / "*.rst.txt")], max_seq_length=64)
    first = prepare(cfg, minilm_tokenizer)
    assert prepare(cfg, minilm_tokenizer).reused
    assert not prepare(cfg.model_copy(update={"max_seq_length": 32}), minilm_tokenizer).reused
    with open(small_corpus / "general.rst.txt", "a") as f:
        f.write("\n\nA new paragraph changes the corpus.\n")
    again = prepare(cfg, minilm_tokenizer)
    assert not again.reused and again.path != first.path


def test_edge_cases_empty_blank_huge_line(tmp_path, minilm_tokenizer):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    huge = " ".join(f"word{i % 50}" for i in range(60_000))  # one 400 KB line, one document
    (tmp_path / "huge.txt").write_text(huge + "\n\nshort doc\n")
    p = prepare(_cfg(tmp_path, [str(tmp_path / "*.txt")], max_seq_length=128, eval_fraction=0.5), minilm_tokenizer)
    s = p.stats
    assert s["documents_train"] + s["documents_eval"] == 2
    assert s["documents_empty_skipped"] >= 1
    assert s["blocks"] > 400 and s["padding_share"] < 0.01  # the huge line is packed into many full blocks


def _complete_dirs(root) -> list:
    return [p for p in root.rglob("stats.json")]


@pytest.mark.parametrize("content", ["", "\n\n\n"])
def test_empty_corpus_is_a_config_error(tmp_path, minilm_tokenizer, content):
    from hpcnlp.config import ConfigError

    (tmp_path / "blank.txt").write_text(content)
    with pytest.raises(ConfigError, match="data.train_files: .*no non-empty document.*Fix") as e:
        prepare(_cfg(tmp_path, [str(tmp_path / "blank.txt")]), minilm_tokenizer)
    assert [p.key for p in e.value.problems] == ["data.train_files"] and len(e.value.lines) == 1
    assert not _complete_dirs(tmp_path / "prepared")


def test_one_document_without_eval_files_is_a_config_error(tmp_path, minilm_tokenizer):
    from hpcnlp.config import ConfigError

    (tmp_path / "one.txt").write_text("\n\nonly one paragraph here\n\n")
    with pytest.raises(ConfigError, match="data.eval_fraction: .*no document was held out.*data.eval_files"):
        prepare(_cfg(tmp_path, [str(tmp_path / "one.txt")]), minilm_tokenizer)
    assert not _complete_dirs(tmp_path / "prepared")


def test_empty_eval_files_is_a_config_error(tmp_path, small_corpus, minilm_tokenizer):
    from hpcnlp.config import ConfigError

    (tmp_path / "blank.txt").write_text("\n\n")
    cfg = _cfg(tmp_path, [str(small_corpus / "*.rst.txt")], eval_files=[str(tmp_path / "blank.txt")])
    with pytest.raises(ConfigError, match="data.eval_files: "):
        prepare(cfg, minilm_tokenizer)
    assert not _complete_dirs(tmp_path / "prepared")


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, small_corpus, minilm_tokenizer, monkeypatch):
    from hpcnlp.data import pack

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack._Packer, "close", boom)
    cfg = _cfg(tmp_path, [str(small_corpus / "*.rst.txt")])
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, minilm_tokenizer)
    # No stats.json, no shard, no .tmp-* build: only the (empty) shards dir and lock files.
    assert not _complete_dirs(tmp_path / "prepared")
    assert not list((tmp_path / "prepared").rglob("meta.json")) and not list((tmp_path / "prepared").rglob(".tmp-*"))
    monkeypatch.undo()
    assert not prepare(cfg, minilm_tokenizer).reused


def test_prepare_cli_prints_stats(tmp_path, small_corpus, capsys):
    import yaml

    from hpcnlp.cli import main

    cfg = {
        "job": "prepare",
        "data": {"train_files": [str(small_corpus / "*.rst.txt")], "prepared_root": str(tmp_path / "prepared")},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prepare", "--config", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "tokens/s" in out and "padding" in out


def test_a_corpus_too_small_to_split_is_refused_before_a_shard_is_written(tmp_path, minilm_tokenizer, capsys):
    """Refused at `hpcnlp check`, and by prepare before it writes: the split is by content hash, known up front."""
    import yaml

    from hpcnlp.cli import main
    from hpcnlp.config import ConfigError

    (tmp_path / "one.txt").write_text("\n\nonly one paragraph here\n\n")
    with pytest.raises(ConfigError, match="no document was held out"):
        prepare(_cfg(tmp_path, [str(tmp_path / "one.txt")]), minilm_tokenizer)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").rglob("*.arrow"))
    config = tmp_path / "prepare.yaml"
    data = {"train_files": [str(tmp_path / "one.txt")], "prepared_root": str(tmp_path / "prepared")}
    config.write_text(yaml.safe_dump({"job": "prepare", "data": data}))
    assert main(["check", "--config", str(config)]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "data.eval_fraction: no document was held out (1 non-empty documents, eval_fraction 0.05)" in line
    (tmp_path / "two.txt").write_text("\n\n".join(f"paragraph number {i}" for i in range(200)))
    config.write_text(yaml.safe_dump({"job": "prepare", "data": {**data, "train_files": [str(tmp_path / "two.txt")]}}))
    assert main(["check", "--config", str(config)]) == 0
