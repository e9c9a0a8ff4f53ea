"""`hpcnlp prepare` (tokenize + pack) throughput and peak memory: num_proc 1 vs 2, corpus x1/x4/x16."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench.pretrain import CORPUS
from bench.timing import peak_rss_mb
from hpcnlp.config import CorpusConfig
from hpcnlp.data.corpus import expand_files
from hpcnlp.data.pack import prepare
from hpcnlp.models import load_tokenizer


def corpus_copies(work: str, times: int) -> str:
    """The shipped corpus repeated `times` times (hard links, or copies across file systems)."""
    root = Path(work) / f"corpus-x{times}"
    if not root.is_dir():
        tmp = root.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for i in range(times):
            for f in expand_files([str(CORPUS / "**" / "*.rst.txt")]):
                dest = tmp / f"copy{i}" / Path(f).relative_to(CORPUS)
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, dest)
                except OSError:
                    shutil.copyfile(f, dest)
        tmp.rename(root)
    return str(root)


def run(work: str, times: int, num_proc: int) -> dict:
    tokenizer = load_tokenizer("minilm-l6")
    root = corpus_copies(work, times)
    cfg = CorpusConfig(
        train_files=[f"{root}/**/*.rst.txt"],
        max_seq_length=128,
        num_proc=num_proc,
        prepared_root=str(Path(work) / f"prepared-x{times}-np{num_proc}"),
    )
    shutil.rmtree(cfg.prepared_root, ignore_errors=True)  # measure a build, never a reuse
    base_rss = peak_rss_mb()  # interpreter + torch + transformers, before any data
    t0 = time.perf_counter()
    stats = prepare(cfg, tokenizer).stats
    seconds = time.perf_counter() - t0
    shutil.rmtree(cfg.prepared_root, ignore_errors=True)
    return {
        "times": times,
        "num_proc": num_proc,
        "tokens": stats["tokens"],
        "blocks": stats["blocks"],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(stats["tokens"] / seconds, 1),
        "padding_share": stats["padding_share"],
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base_rss,
    }
