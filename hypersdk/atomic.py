"""Atomic publication of local files: write under a temporary name, fsync, then rename.

A reader never sees a half-written file under its final name, whatever happens mid-way (full disk,
crash, Ctrl-C): the temporary file is removed on failure.

Cache modes, with qemu-img's names and meaning:
- ``writeback`` (default): through the page cache, fsync before the rename: durable.
- ``none``: O_DIRECT (bypassing the page cache), then fsync: durable, and steady on large files
  because no dirty pages pile up; falls back to writeback where the filesystem refuses O_DIRECT.
- ``unsafe``: page cache, no fsync (qemu-img convert's default). The rename is still atomic for
  running processes, but after a power loss the file may hold less than it claims.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from hypersdk.errors import InvalidParameterError
from hypersdk.io import DirectFileSink, FileSink, target_error

CACHE_MODES = ("writeback", "none", "unsafe")


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_cache_mode(cache: str) -> str:
    if cache not in CACHE_MODES:
        raise InvalidParameterError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    return cache


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, cache: str = "writeback") -> Iterator[FileSink]:
    """Yield a FileSink on a temp file next to ``path``; publish it on clean exit only."""
    check_cache_mode(cache)
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise target_error(directory, exc) from None
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    direct = cache == "none" and hasattr(os, "O_DIRECT")
    try:
        try:
            fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            direct = False  # tmpfs and friends: no O_DIRECT, the page cache it is
            fd = os.open(tmp, flags, 0o644)
    except OSError as exc:
        raise target_error(path, exc) from None
    published = False
    sink = DirectFileSink(fd, path) if direct else FileSink(fd, path)
    try:
        yield sink
        sink.finish()
        if cache != "unsafe":
            try:
                os.fsync(fd)
            except OSError as exc:
                raise target_error(path, exc) from None
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        published = True
        if cache != "unsafe":
            _fsync_dir(directory)
    finally:
        sink.close()
        if fd >= 0:
            os.close(fd)
        if not published:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as sink:
        sink.write(data)
