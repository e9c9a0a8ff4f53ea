"""Concurrent preparers of one fingerprint (one builds, the others wait and reuse) and signals in workers."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time

from hpcnlp.config import CorpusConfig


def _cfg(small_corpus, root) -> CorpusConfig:
    return CorpusConfig(train_files=[str(small_corpus / "*.rst.txt")], prepared_root=str(root), max_seq_length=64)


def _prepare_worker(small_corpus, root, barrier, results) -> None:
    """One preparer in a fresh (spawned) process, like one Slurm array task."""
    from hpcnlp.data.pack import prepare
    from hpcnlp.models import load_tokenizer

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("hpcnlp").addHandler(handler)
    logging.getLogger("hpcnlp").setLevel(logging.INFO)
    tokenizer = load_tokenizer("minilm-l6")
    barrier.wait(timeout=120)  # both imported and loaded: start preparing at the same moment
    try:
        p = prepare(_cfg(small_corpus, root), tokenizer)
    except BaseException as e:  # report it: the test fails at once instead of waiting for a result
        results.put((None, None, [f"prepare failed: {e!r}"]))
        raise
    results.put((str(p.path), p.reused, lines))


def test_concurrent_preparers_build_once_and_share(tmp_path, small_corpus):
    root = tmp_path / "prepared"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_worker, args=(small_corpus, root, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=300) for _ in procs]  # before join: a full queue would block the child
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    (path, _, lines), (other_path, _, other_lines) = out
    assert path is not None and path == other_path, lines + other_lines  # both succeeded, on one dir
    assert [p.exitcode for p in procs] == [0, 0]
    builder, reuser = sorted(out, key=lambda r: r[1])
    assert (builder[1], reuser[1]) == (False, True)  # exactly one built it
    assert any("waiting for another preparer of shard" in line for line in reuser[2])  # it waited, not built
    assert not any("waiting for another preparer of shard" in line for line in builder[2])
    # One dataset, no leftover .tmp-* build; the lock file is hidden and holds no stats.json.
    assert [p.name for p in root.iterdir()] == [os.path.basename(path)]
    final = root / os.path.basename(path)
    assert sorted(p.name for p in final.iterdir()) == ["locks", "order.npy", "shards", "stats.json"]
    assert [p.name for p in (final / "shards").iterdir()] == ["00000"]


def test_rename_race_without_lock_reuses_the_finished_result(tmp_path, small_corpus, minilm_tokenizer, monkeypatch):
    """Where flock is unavailable two builds of a shard can overlap: the slower one uses the first's."""
    from hpcnlp.data import pack

    cfg, real_build, race = _cfg(small_corpus, tmp_path / "prepared"), pack.build_shard, {}

    def build_while_another_finishes(shard, cfg_, tok, offsets, dest, earlier=None):
        if not race:  # only in the outer build: another preparer completes meanwhile
            race["started"] = True
            race["winner"] = pack.prepare(cfg, minilm_tokenizer)
        return real_build(shard, cfg_, tok, offsets, dest)

    monkeypatch.setattr(pack, "exclusive_lock", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(pack, "build_shard", build_while_another_finishes)
    p = pack.prepare(cfg, minilm_tokenizer)
    winner = race["winner"]
    assert not winner.reused and p.reused and p.path == winner.path and p.stats == winner.stats
    assert [x.name for x in (p.path / "shards").iterdir()] == ["00000"]  # our duplicate is gone
    assert not [x for x in p.path.rglob(".tmp-*")]


def test_preemption_handlers_do_not_leak_into_forked_workers(tmp_path):
    """A forked worker (dataset map, dataloader) that inherited the handlers dies of SIGTERM as usual."""
    from hpcnlp.runtime.preempt import PreemptionCallback

    ctx = multiprocessing.get_context("fork")
    running = ctx.Event()

    def sleeper():
        running.set()
        time.sleep(60)  # far beyond the join below: only the signal can end it in time

    cb = PreemptionCallback(str(tmp_path))
    cb.install_handlers()
    child = ctx.Process(target=sleeper)
    try:
        child.start()
        assert running.wait(10)  # signal it once it runs Python, not in the middle of the fork
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=10)  # dies at once; the margin is for a busy machine
        assert child.exitcode == -signal.SIGTERM
        assert not cb.requested
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        cb.restore_handlers()
