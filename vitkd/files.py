"""Atomic file writes (a reader never sees half a file) and the cross-process lock that serialises writers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "write_text_atomic", "exclusive_lock", "file_sha256"]


@contextlib.contextmanager
def atomic_target(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, ``os.replace`` it onto ``path``.

    ``mode`` is set before the rename (``mkstemp`` makes 0600, but checkpoints and results
    are meant to be shared, e.g. copied into a Docker image). The file is fsynced before the
    rename and its directory after it, so a power loss leaves the old or the new file, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive ``flock`` on ``path`` (created if missing).

    Serialises read-modify-write sequences across threads and processes; the kernel drops the
    lock when its holder dies, so a crash never leaves it stale. Not reentrant: a holder that
    takes it again through another open would wait forever.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file drops the lock


def file_sha256(path: str | Path) -> str:
    """A file's content identity (hex SHA-256), e.g. which teacher a student learned from, whatever its path."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
