"""Byte plumbing shared by every layer: random-access readers and sequential sinks.

Readers (``RangeReader``) are what sources and targets hand out; format drivers read through them.
Sinks (``Sink``) are what format writers emit into, strictly in order, so an output can stream
into an encryptor or a multipart upload. ``write_zeros`` lets a local file stay sparse while a
stream simply receives zero bytes.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol, runtime_checkable

from hypersdk.errors import DiskReadError, TargetError, TargetFullError
from hypersdk.extents import Extent, ExtentMap

IO_CHUNK = 4 * 1024 * 1024  # large aligned I/O everywhere
_ZEROS = bytes(IO_CHUNK)


@runtime_checkable
class RangeReader(Protocol):
    """Random-access, read-only view of a byte sequence of known size."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class FileRangeReader:
    """RangeReader over a local file with pread; short reads past EOF are zero-filled."""

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        self.name = os.fspath(path)
        try:
            self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise DiskReadError(f"cannot open {self.name}: {exc.strerror}") from None
        self.size = os.fstat(self._fd).st_size if size is None else size

    @property
    def fd(self) -> int:
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise DiskReadError(f"{self.name}: read at {offset} failed: {exc.strerror}") from None
        if len(data) < length:
            # pread may return short on large requests; loop before zero-filling past EOF.
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
            if len(data) < length:
                data += bytes(length - len(data))
        return data

    def allocated(self) -> ExtentMap:
        """Extents the filesystem holds data for (SEEK_DATA/SEEK_HOLE); whole file if unsupported."""
        return allocated_extents(self._fd, self.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileRangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def allocated_extents(fd: int, size: int) -> ExtentMap:
    """Data extents of a file per SEEK_DATA/SEEK_HOLE; the whole file where that is unsupported."""
    extents: list[Extent] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no more data
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append(Extent(start, end - start))
            pos = end
    except (OSError, AttributeError):
        return ExtentMap.full(size)
    return ExtentMap(size, extents)


class Sink(Protocol):
    """Sequential output. Writers call write/write_zeros in order and never seek."""

    def write(self, data: bytes | memoryview) -> int: ...

    def write_zeros(self, length: int) -> None: ...

    def tell(self) -> int: ...


class StreamSink:
    """Adapts any object with ``write`` (a pipe, an upload stream, an encryptor) to a Sink."""

    def __init__(self, stream):
        self._stream = stream
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        self._stream.write(data)
        self._pos += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        while length > 0:
            n = min(length, IO_CHUNK)
            self.write(memoryview(_ZEROS)[:n])
            length -= n

    def tell(self) -> int:
        return self._pos


class FileSink:
    """Sink onto a local file descriptor: zeros become holes (sparse), the size is set at close."""

    def __init__(self, fd: int, name: str = "<file>"):
        self._fd = fd
        self._name = name
        self._pos = 0
        self._hole_pending = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        total = len(view)
        try:
            while view:
                n = os.pwrite(self._fd, view, self._pos)
                self._pos += n
                view = view[n:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise TargetFullError(
                    f"{self._name}: no space left on target ({exc.strerror})"
                ) from None
            raise TargetError(f"{self._name}: write failed: {exc.strerror}") from None
        return total

    def write_zeros(self, length: int) -> None:
        if length:
            self._pos += length
            self._hole_pending = True

    def tell(self) -> int:
        return self._pos

    def finish(self) -> None:
        """Extend the file to cover trailing zeros written as a hole."""
        try:
            if self._hole_pending and os.fstat(self._fd).st_size < self._pos:
                os.ftruncate(self._fd, self._pos)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise TargetFullError(
                    f"{self._name}: no space left on target ({exc.strerror})"
                ) from None
            raise TargetError(f"{self._name}: cannot set size: {exc.strerror}") from None


class TeeSink:
    """Passes everything to ``inner`` and feeds the same bytes to observers (hashers, counters)."""

    def __init__(self, inner: Sink, *observers):
        self._inner = inner
        self._observers = observers

    def write(self, data: bytes | memoryview) -> int:
        n = self._inner.write(data)
        for obs in self._observers:
            obs.update(data)
        return n

    def write_zeros(self, length: int) -> None:
        self._inner.write_zeros(length)
        if self._observers:
            remaining = length
            while remaining > 0:
                n = min(remaining, IO_CHUNK)
                chunk = memoryview(_ZEROS)[:n]
                for obs in self._observers:
                    obs.update(chunk)
                remaining -= n

    def tell(self) -> int:
        return self._inner.tell()


def read_ahead(source, pieces, depth: int = 2):
    """Yield ``(extent, bytes)`` for each extent in ``pieces``, reading ``depth`` ahead in a thread.

    Sources read with pread or HTTP, both of which release the GIL, so reading overlaps with the
    caller's hashing, compressing or writing.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    it = iter(pieces)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        queue: deque = deque()
        for piece in it:
            queue.append((piece, pool.submit(source.read, piece.offset, piece.length)))
            if len(queue) > depth:
                head, fut = queue.popleft()
                yield head, fut.result()
        while queue:
            head, fut = queue.popleft()
            yield head, fut.result()
