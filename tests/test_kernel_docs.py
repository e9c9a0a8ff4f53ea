"""The technical-domain task (data/fetch_kernel_docs.py) on a small Documentation/ tree: split by file,
domain text without the held-out files, the same bytes from the same input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_kernel_docs", REPO / "data" / "fetch_kernel_docs.py")
kd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kd)


def prose(area: str, f: int, i: int) -> str:
    return (
        f"The {area} layer in file {f} describes paragraph {i} of its interface, which drivers use "
        f"to register devices, report their state and release resources when they are removed."
    )


def documentation(root: Path) -> Path:
    docs = root / "Documentation"
    for area in ("networking", "filesystems", "mm"):
        for f in range(8):
            body = "Title\n=====\n\n" + "\n\n".join(prose(area, f, i) for i in range(3 + f % 3))
            body += "\n\n.. note:: a directive, never a paragraph of the task\n\n    indented code block\n"
            (docs / area / f"doc{f}.rst").parent.mkdir(parents=True, exist_ok=True)
            (docs / area / f"doc{f}.rst").write_text(body)
    (docs / "admin-guide").mkdir()
    (docs / "admin-guide" / "book.rst").write_text(prose("admin", 0, 0))
    (docs / "translations" / "it_IT").mkdir(parents=True)
    (docs / "translations" / "it_IT" / "mm.rst").write_text(prose("tradotto", 0, 0))
    return docs


def test_split_by_file_and_domain_text_without_held_out_files(tmp_path, monkeypatch):
    monkeypatch.setattr(kd, "LOW_BUDGET", 20)
    stats = kd.build(documentation(tmp_path), "6.1-test", tmp_path / "out")
    out = tmp_path / "out"
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in kd.HELD_OUT_SHARE}
    rows["train"] = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    files = {
        s: {r["text"].split(" in file ")[0] + r["text"].split(" in file ")[1][:2] for r in v} for s, v in rows.items()
    }
    assert all(files[a].isdisjoint(files[b]) for a in files for b in files if a < b)  # no file on two sides
    assert {r["label"] for r in rows["test"]} <= {"networking", "filesystems", "mm"}
    assert not any("directive" in r["text"] or "code block" in r["text"] for v in rows.values() for r in v)
    held = {p.relative_to(out / "domain-eval") for p in (out / "domain-eval").rglob("*.rst")}
    domain = {p.relative_to(out / "domain") for p in (out / "domain").rglob("*.rst")}
    assert held and held.isdisjoint(domain)
    assert Path("admin-guide/book.rst") in domain  # the books are domain text, not labels
    assert not any(p.parts[0] == "translations" for p in held | domain)
    # every held-out paragraph's file is in domain-eval, none in domain
    held_text = "".join((out / "domain-eval" / p).read_text() for p in held)
    assert all(r["text"][:60] in held_text.replace("\n", " ") for s in kd.HELD_OUT_SHARE for r in rows[s])
    assert stats["paragraphs"]["train"] == len(rows["train"]) and stats["domain_eval_files"] == len(held)


def test_the_same_tree_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(kd, "LOW_BUDGET", 20)
    docs = documentation(tmp_path)
    kd.build(docs, "6.1-test", tmp_path / "a")
    kd.build(docs, "6.1-test", tmp_path / "b")
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "train-low.jsonl", "stats.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
