"""Atomic writes: what they leave has the modes the umask gives a normal file; a replaced dir is never absent."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from hpcnlp.runtime import io


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_shared_by_umask(root: Path, mask: int) -> None:
    """Every file and dir under `root` (itself included) as open()/mkdir() make them under `mask`: readable
    by the group, and by the world only where the umask allows."""
    paths = [root, *root.rglob("*")]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert mode(p) == want, f"{p}: {oct(mode(p))}, umask {oct(mask)} gives {oct(want)}"
        assert mode(p) & (0o050 if p.is_dir() else 0o040), p  # the group reads (and enters dirs)
        if mask == 0o027:
            assert not mode(p) & 0o007, p  # the world does not


def test_umask_is_read_without_changing_it(umask):
    assert io.umask() == umask
    assert os.umask(umask) == umask  # still set: reading it did not leave another one


def test_atomic_file_has_the_umask_mode(tmp_path, umask):
    path = io.atomic_write_text(tmp_path / "out" / "report.md", "hello")
    assert_shared_by_umask(path, umask)
    assert mode(path.parent) == 0o777 & ~umask


def test_atomic_dir_has_the_umask_mode(tmp_path, umask):
    with io.atomic_dir(tmp_path / "result") as tmp:
        (tmp / "data.bin").write_bytes(b"x")
        io.atomic_write_json(tmp / "stats.json", {"n": 1})
        (tmp / "sub").mkdir()
    assert_shared_by_umask(tmp_path / "result", umask)


def test_prepared_data_dir_has_the_umask_mode(tmp_path, umask):
    """`hpcnlp prepare` builds its dir with atomic_dir: the prepared data a group shares is readable by it."""
    from helpers import CORPUS

    from hpcnlp.config import CorpusConfig
    from hpcnlp.data.pack import prepare
    from hpcnlp.models import load_tokenizer

    cfg = CorpusConfig(
        train_files=[str(CORPUS / "tutorial" / "introduction.rst.txt")],
        max_seq_length=32,
        eval_fraction=0.2,
        prepared_root=str(tmp_path / "prepared"),
    )
    out = Path(prepare(cfg, load_tokenizer("minilm-l6")).path)
    assert out.parent == tmp_path / "prepared"
    assert_shared_by_umask(out, umask)


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    final, new = tmp_path / "v1", tmp_path / ".staging"
    for d, text in ((final, "old"), (new, "new")):
        d.mkdir()
        (d / "marker").write_text(text)
    return new, final


def test_replace_dir_never_leaves_neither(tmp_path, monkeypatch):
    """When the old dir is deleted, the new one is already in place: no moment with nothing at `final`."""
    new, final = _dirs(tmp_path)
    seen = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(
        shutil, "rmtree", lambda p, **kw: (seen.append((final / "marker").read_text()), rmtree(p, **kw))
    )
    io.replace_dir(new, final)
    assert seen == ["new"]  # deleting the old one, the new one was at `final` already
    assert (final / "marker").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_replace_dir_without_renameat2_renames_aside(tmp_path, monkeypatch, caplog):
    new, final = _dirs(tmp_path)
    io._renameat2.cache_clear()
    monkeypatch.setattr(io.ctypes, "CDLL", lambda *a, **kw: object())  # a C library without renameat2
    try:
        with caplog.at_level(logging.WARNING):
            io.replace_dir(new, final)
    finally:
        io._renameat2.cache_clear()
    assert (final / "marker").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    assert "no renameat2" in caplog.text


def test_publish_swaps_bundles_in_one_step(tmp_path, monkeypatch):
    from hpcnlp.ship import bundle

    new, final = _dirs(tmp_path)
    with pytest.raises(FileExistsError, match="immutable"):
        bundle.publish(new, final)
    calls = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((a, b)), replace(a, b)))
    bundle.publish(new, final, replace=True)
    assert calls == []  # no rename that takes the old one away before the new one is there
    assert (final / "marker").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
