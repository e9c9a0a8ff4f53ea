"""Atomic writes: a reader sees the old file, the new file, or nothing; never half a file."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name next to `final`; rename it into place on success.

    An interrupted build leaves only a `.tmp-*` sibling, which never looks like a finished result.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} appeared while it was being built")
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, holder_is: str = "another process") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the duration of the block.

    fcntl.flock locks across processes and, on local filesystems and NFSv4 (where the client maps it
    to a byte-range lock on the server), across nodes too. The kernel drops the lock when its holder
    dies, so a killed job never leaves a stale lock. The file itself is left in place: deleting a lock
    file that others may be blocked on would let two of them hold "the" lock at once.
    Where the filesystem has no flock (e.g. Lustre mounted with noflock) this warns and runs the block
    unlocked, so a caller must still tolerate a concurrent run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
            log.info("waiting for %s (%s) to release %s", holder_is, holder, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("%s: cannot lock (%s); going on without the lock", path, e)
        # Name ourselves in the file for the next waiter's log line (informational only).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """`path` is one of `roots` or lies below one of them (paths compared absolute, not resolved)."""
    p = os.path.abspath(path)
    return any(p == os.path.abspath(r) or p.startswith(os.path.abspath(r) + os.sep) for r in roots)
