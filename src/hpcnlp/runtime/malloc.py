"""Keep a long job's memory flat under glibc's malloc.

glibc serves blocks of at least M_MMAP_THRESHOLD bytes with mmap (returned to the OS when freed) and
smaller ones from its heaps (one arena per thread). The threshold starts at 128 KiB and, by default,
rises to the size of every mmapped block freed (up to 32 MiB): after the first steps most activations
come from the heaps, whose free space is fragmented by blocks of other lifetimes and seldom given back.
Seen on CPU MLM pretraining of MiniLM-L6 (2 cores): resident memory climbing for as long as the run
went, e.g. 2.7 -> 4.0 GB in 160 steps of 32 x 128 tokens, 1.87 -> 2.2 GB in 120 steps of 16 x 128 (not in
every run: it depends on the heap's history). With the threshold fixed at its start value, 4 of 4 runs
stayed flat (1.53 GB peak), at the same speed (two runs side by side, one thread each: 657 vs 658
tokens/s). mallopt at job start does what MALLOC_MMAP_THRESHOLD_ in the environment would, for every
entry point. A user's own MALLOC_MMAP_THRESHOLD_, or another allocator in LD_PRELOAD (jemalloc,
tcmalloc), is left alone. (On GPUs activations live in the CUDA allocator; this is the host side.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed


def fix_mmap_threshold() -> bool:
    """True when this process's glibc malloc now keeps its mmap threshold fixed."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: its libc, no library search
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; glibc's dynamic threshold stays")
    return ok
