"""Atomic writes: a reader sees the old file, the new file, or nothing; never half a file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status, kernel >= 4.7).
    Elsewhere os.umask must set one to read the old: 0o077 for that instant, so a file another thread
    creates meanwhile gets a stricter mode, never a looser one."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def normal_mode(path: str | os.PathLike) -> None:
    """Give what mkstemp (0600) or mkdtemp (0700) made the mode an ordinary open or mkdir gives under this
    umask: results are read by others (the group, deployment teams), and the rename keeps the mode."""
    mode = (0o777 if os.path.isdir(path) else 0o666) & ~umask()
    os.chmod(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            normal_mode(tmp)
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
    normal_mode(tmp)
    try:
        yield tmp
        if final.exists() and not replace:
            raise FileExistsError(f"{final} appeared while it was being built")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Rename dir `new` to `final`, deleting what was there: readers see the old dir or the new one, never
    neither. An existing `final` is swapped with `new` in one step (renameat2 RENAME_EXCHANGE), then the
    old one, now at `new`, is deleted. Without that call (not Linux or glibc < 2.28, or a filesystem
    without it) the old dir is renamed aside first, which leaves a moment with nothing at `final`."""
    if not final.exists():
        os.replace(new, final)
    elif exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2 (2.28+), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically; False (logged) where this system cannot."""
    fn = _renameat2()
    if fn is None:
        log.warning("no renameat2 in this C library: replacing %s by renaming the old one aside", b)
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        log.warning("cannot swap %s and %s in one step (%s): renaming the old one aside", a, b, os.strerror(err))
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
    """`path` is one of `roots` or lies below one of them, compared resolved (os.path.realpath): a
    symlink or another spelling of a dir is that dir."""
    p = os.path.realpath(path)
    return any(p == os.path.realpath(r) or p.startswith(os.path.realpath(r).rstrip(os.sep) + os.sep) for r in roots)
