"""Atomic publication of local files: write under a temporary name, fsync, then rename.

A reader never sees a half-written file under its final name, whatever happens mid-way (full disk,
crash, Ctrl-C): the temporary file is removed on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from hypersdk.errors import TargetError, TargetFullError
from hypersdk.io import FileSink


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _wrap_os_error(path: str, exc: OSError) -> TargetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TargetFullError(f"{path}: no space left on target ({exc.strerror})")
    return TargetError(f"{path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[FileSink]:
    """Yield a FileSink on a temp file next to ``path``; publish it on clean exit only."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise _wrap_os_error(directory, exc) from None
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _wrap_os_error(path, exc) from None
    published = False
    try:
        sink = FileSink(fd, path)
        yield sink
        sink.finish()
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _wrap_os_error(path, exc) from None
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        published = True
        _fsync_dir(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        if not published:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as sink:
        sink.write(data)
