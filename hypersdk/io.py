"""Byte plumbing shared by every layer: random-access readers and sequential sinks.

Readers (``RangeReader``) are what sources and targets hand out; format drivers read through them.
Sinks (``Sink``) are what format writers emit into, strictly in order, so an output can stream
into an encryptor or a multipart upload. ``write_zeros`` lets a local file stay sparse while a
stream simply receives zero bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from hypersdk import cancel
from hypersdk.errors import DiskReadError, TargetError, TargetFullError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap

log = logging.getLogger(__name__)

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
        self._fd = -1
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever
            self._fd = os.open(self.name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISBLK(mode):
                real_size = os.lseek(self._fd, 0, os.SEEK_END)
            elif stat.S_ISREG(mode):
                real_size = os.fstat(self._fd).st_size
            else:
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file or block device"
                self.close()
                raise DiskReadError(f"cannot read {self.name}: it is {kind}")
            os.set_blocking(self._fd, True)
        except OSError as exc:
            self.close()
            raise DiskReadError(f"cannot open {self.name}: {exc.strerror}") from None
        self.size = real_size if size is None else size

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

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (zeros past EOF), with no new allocation."""
        got = 0
        want = len(view)
        try:
            while got < want:
                n = os.preadv(self._fd, [view[got:]], offset + got)
                if n == 0:
                    view[got:] = bytes(want - got)
                    return
                got += n
        except OSError as exc:
            raise DiskReadError(f"{self.name}: read at {offset} failed: {exc.strerror}") from None

    def zero_heads(self, start: int, stop: int, step: int, width: int = 8) -> list[int]:
        """Offsets in ``range(start, stop, step)`` whose first ``width`` bytes read as zeros.

        The probe of a data scan: one tiny pread per block in a tight loop (about 1 us each), so
        a GiB of 64 KiB blocks is settled in ~20 ms and only the few candidates are read whole."""
        pread, fd = os.pread, self._fd
        try:  # a short read (past EOF) reads as zeros, as everywhere in this reader
            return [
                off for off in range(start, stop, step) if not pread(fd, width, off).lstrip(b"\0")
            ]
        except OSError as exc:
            raise DiskReadError(f"{self.name}: read failed: {exc.strerror}") from None

    def allocated(self) -> ExtentMap:
        """Extents the filesystem holds data for (SEEK_DATA/SEEK_HOLE); whole file if unsupported."""
        found = ExtentCollector(self.size)
        found.extend(self.iter_allocated())
        return found.build()

    def iter_allocated(self) -> Iterator[Extent]:
        """The same extents, found lazily in order: a scan that streams them never holds a
        fragmented file's whole allocation map."""
        return iter_allocated(self._fd, self.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileRangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_allocated(fd: int, size: int) -> Iterator[Extent]:
    """Data extents of a file per SEEK_DATA/SEEK_HOLE, in order; the rest of the file as one
    extent from wherever that is unsupported."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    pos = 0
    while pos < size:
        try:
            if seek_data is None or seek_hole is None:
                raise OSError(errno.EINVAL, "SEEK_DATA unsupported")
            start = os.lseek(fd, pos, seek_data)
            if start >= size:
                return
            end = min(os.lseek(fd, start, seek_hole), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no more data
                return
            yield Extent(pos, size - pos)
            return
        yield Extent(start, end - start)
        pos = end


class Sink(Protocol):
    """Sequential output. Writers call write/write_zeros in order and never seek."""

    def write(self, data: bytes | memoryview) -> int: ...

    def write_zeros(self, length: int) -> None: ...

    def tell(self) -> int: ...


def write_zero_bytes(write, length: int) -> None:
    """Feed ``length`` zero bytes to ``write`` (a sink's or a hasher's), a chunk at a time."""
    view = memoryview(_ZEROS)
    while length > 0:
        n = min(length, IO_CHUNK)
        write(view[:n])
        length -= n


class ZeroBytesSink:
    """Base of sinks that store every byte (streams, uploads, encryptors): zeros are written
    as real zero bytes. Sinks onto local files override ``write_zeros`` to leave holes."""

    def write(self, data: bytes | memoryview) -> int:
        raise NotImplementedError

    def write_zeros(self, length: int) -> None:
        write_zero_bytes(self.write, length)


class StreamSink(ZeroBytesSink):
    """Adapts any object with ``write`` (a pipe, an upload stream, an encryptor) to a Sink."""

    def __init__(self, stream):
        self._stream = stream
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        self._stream.write(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos


def disk_full(exc: OSError) -> bool:
    """A write failed for want of room: no space, a quota, or a file-size limit."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def target_error(name: str, exc: OSError, doing: str | None = None) -> TargetError:
    """A failed write to a local target as a typed error: a full disk (or quota, or file-size
    limit) is TargetFullError, so callers can tell "make room" from "something broke"."""
    if disk_full(exc):
        return TargetFullError(f"{name}: no space left on target ({exc.strerror})")
    if doing:
        return TargetError(f"{name}: {doing} failed: {exc.strerror}")
    return TargetError(f"{name}: {exc.strerror or exc}")


class FileSink:
    """Sink onto a local file descriptor: zeros become holes (sparse), the size is set at close."""

    def __init__(self, fd: int, name: str = "<file>"):
        self._fd = fd
        self._name = name
        self._pos = 0
        self._hole_pending = False

    def _failed(self, exc: OSError, doing: str) -> TargetError:
        return target_error(self._name, exc, doing)

    def _pwrite(self, view: memoryview, at: int) -> None:
        try:
            _pwrite_all(self._fd, view, at)
        except OSError as exc:
            raise self._failed(exc, "write") from None

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        self._pwrite(memoryview(data), self._pos)
        self._pos += n
        return n

    def write_zeros(self, length: int) -> None:
        if length:
            self._pos += length
            self._hole_pending = True

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        """Release what the sink holds (nothing for a plain file)."""

    def finish(self) -> None:
        """Extend the file to cover trailing zeros written as a hole."""
        try:
            if self._hole_pending and os.fstat(self._fd).st_size < self._pos:
                os.ftruncate(self._fd, self._pos)
        except OSError as exc:
            raise self._failed(exc, "setting the size") from None


DIRECT_ALIGN = 4096  # what O_DIRECT needs of offsets, lengths and memory on common devices


class DirectFileSink(FileSink):
    """FileSink for a descriptor opened with O_DIRECT: bytes go to the disk, not the page cache.

    Durable output without the page-cache detour: no dirty pages to allocate, copy and flush
    later, so a large export costs what the disk takes, steadily. O_DIRECT needs aligned
    offsets, lengths and memory, so bytes are gathered in page-aligned staging buffers of whole
    blocks, and a background thread writes full buffers while the caller fills the next (the
    disk always has a large write in flight). Whole zero blocks stay holes; the padding of the
    last block is cut off in ``finish``. Where the filesystem refuses O_DIRECT mid-way, the
    descriptor drops it and carries on through the page cache.
    """

    def __init__(
        self,
        fd: int,
        name: str = "<file>",
        stage: int = 8 * 1024 * 1024,
        depth: int = 3,
        threads: int = 2,
    ):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(fd, name)
        self._free = deque(aligned_buffer(stage) for _ in range(depth + 1))
        self._stage = self._free.pop()
        self._stage_at = 0  # file offset of stage[0]: always aligned
        self._fill = 0  # staged bytes; invariant: pos == stage_at + fill
        self._pending: deque = deque()  # (future, buffer) of writes in flight, oldest first
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="direct-write")

    def _pwrite(self, view: memoryview, at: int) -> None:
        import fcntl

        try:
            _pwrite_all(self._fd, view, at)
            return
        except OSError as exc:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise self._failed(exc, "write") from None
            # the filesystem refuses direct I/O after all: drop it and go through the page cache
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            log.warning(
                "%s: the filesystem refuses direct writes: going on through the page cache",
                self._name,
            )
        super()._pwrite(view, at)

    def _reap(self, block: bool) -> None:
        """Collect finished writes (raising their errors); with ``block``, wait for the oldest."""
        while self._pending and (block or self._pending[0][0].done()):
            done, buf = self._pending.popleft()
            self._free.append(buf)
            done.result()
            block = False

    def _submit(self, length: int) -> None:
        """Hand stage[:length] (whole blocks) to the writer thread; keep the rest staged."""
        self._reap(block=not self._free)
        buf, nxt = self._stage, self._free.pop()
        rest = self._fill - length
        if rest > 0:
            nxt[:rest] = buf[length : self._fill]
        self._pending.append((self._pool.submit(self._pwrite, buf[:length], self._stage_at), buf))
        self._stage = nxt
        self._stage_at += length
        self._fill = max(0, rest)

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        size = len(self._stage)
        while view:
            take = min(len(view), size - self._fill)
            self._stage[self._fill : self._fill + take] = view[:take]
            self._fill += take
            self._pos += take
            view = view[take:]
            if self._fill == size:
                self._submit(size)
        return n

    def _stage_zeros(self, length: int) -> None:
        self._stage[self._fill : self._fill + length] = _ZEROS[:length]
        self._fill += length
        self._pos += length
        if self._fill == len(self._stage):
            self._submit(self._fill)

    def write_zeros(self, length: int) -> None:
        if self._fill:  # complete the staged block with zeros, then send off what is staged
            head = min(length, -self._pos % DIRECT_ALIGN)
            self._stage_zeros(head)
            length -= head
            if not length:
                return
            if self._fill:
                self._submit(self._fill)
        hole = length - length % DIRECT_ALIGN
        if hole:
            self._pos += hole
            self._stage_at = self._pos
            self._hole_pending = True
        self._stage_zeros(length - hole)

    def finish(self) -> None:
        if self._fill:
            padded = self._fill + -self._fill % DIRECT_ALIGN
            self._stage[self._fill : padded] = _ZEROS[: padded - self._fill]
            end = self._pos
            self._fill = padded
            self._submit(padded)
            self._stage_at = self._pos = end
        while self._pending:
            self._reap(block=True)
        try:
            if os.fstat(self._fd).st_size != self._pos:
                os.ftruncate(self._fd, self._pos)
        except OSError as exc:
            raise self._failed(exc, "setting the size") from None

    def close(self) -> None:
        """Stop the writer thread (after ``finish``, or on failure: pending writes are moot)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:
        n = os.pwrite(fd, view, at)
        at += n
        view = view[n:]


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
        for obs in self._observers:
            write_zero_bytes(obs.update, length)

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
                data = fut.result()
                cancel.check()  # once per piece: a stopped run reads no more
                yield head, data
        while queue:
            head, fut = queue.popleft()
            data = fut.result()
            cancel.check()
            yield head, data


def aligned_buffer(size: int) -> memoryview:
    """A page-aligned, writable buffer (anonymous mmap): direct I/O can use it as it is."""
    return memoryview(mmap.mmap(-1, size))


class _Loans:
    """Ring buffers lent to a later stage without a copy (hypersdk.stages.Pipe): a ring buffer
    of ``read_pieces`` is refilled only once every view of it that was lent has been written.

    A writer hands the pipeline a view of the read buffer it was given; copying it into the
    pipe would cost a memcpy of every byte the export stores. The borrower registers a loan
    and returns it when the next stage is done with the bytes; ``read_pieces`` waits for the
    loans of a buffer before reading into it again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loans: dict[int, list[threading.Event]] = {}

    def open(self, buf: memoryview) -> None:
        with self._lock:
            self._loans[id(buf.obj)] = []

    def close(self, buf: memoryview) -> None:
        with self._lock:
            self._loans.pop(id(buf.obj), None)

    def lend(self, view: memoryview) -> Callable[[], None] | None:
        """A callback that returns the loan, or None if ``view`` is not of a lendable buffer."""
        with self._lock:
            loans = self._loans.get(id(view.obj))
            if loans is None:
                return None
            back = threading.Event()
            loans.append(back)
            return back.set

    def settle(self, buf: memoryview) -> None:
        """Wait until every loan of ``buf`` is back."""
        with self._lock:
            loans = self._loans.get(id(buf.obj))
            pending, loans[:] = (list(loans), []) if loans else ([], loans)
        for back in pending:
            back.wait()


LOANS = _Loans()


def read_pieces(
    source,
    pieces: Iterable[Extent],
    depth: int = 4,
    chunk: int = IO_CHUNK,
    threads: int = 1,
) -> Iterator[tuple[Extent, memoryview]]:
    """Yield ``(extent, view)`` for each extent of ``pieces`` (each at most ``chunk`` long), in order.

    The fast path of every full-disk pass (scan, convert, hash): ``threads`` reader threads fill
    a small ring of reused page-aligned buffers up to ``depth`` pieces ahead, so nothing is
    allocated per piece and reading overlaps the caller's work. A view is valid only until the
    next item is requested: callers that keep data longer use ``read_ahead``. Sources without
    ``readinto(offset, view)`` fall back to their ``read``. A ``readinto`` that hands the view to
    more work (hashing on another thread) returns a future for it; the buffer is reused only
    once that is done too.
    """
    readinto = getattr(source, "readinto", None)
    # a source whose reads run elsewhere (a pipeline's download stage) takes them as jobs
    submit_readinto = getattr(source, "submit_readinto", None)
    if readinto is None and submit_readinto is None:
        for piece, data in read_ahead(source, pieces, depth):
            yield piece, memoryview(data)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    it = iter(pieces)
    ring = [aligned_buffer(chunk) for _ in range(depth + 1)]
    free = deque(ring)
    inflight: deque = deque()
    workers = 0 if submit_readinto is not None else threads
    for buf in ring:
        LOANS.open(buf)
    with (
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="read-pieces") as pool,
        contextlib.ExitStack() as loans,
    ):
        for buf in ring:  # a lent view keeps its buffer alive: only the registration ends
            loans.callback(LOANS.close, buf)
        if submit_readinto is None:
            submit_readinto = functools.partial(pool.submit, readinto)

        def submit() -> bool:
            piece = next(it, None)
            if piece is None:
                return False
            if piece.length > chunk:
                raise ValueError(f"piece of {piece.length} bytes exceeds chunk {chunk}")
            buf = free.popleft()
            view = buf[: piece.length]
            inflight.append((piece, view, buf, submit_readinto(piece.offset, view)))
            return True

        while free and submit():
            pass
        while inflight:
            piece, view, buf, done = inflight.popleft()
            still_using = done.result()
            cancel.check()  # once per piece: a stopped run (scan, convert, hash, verify) stops
            yield piece, view
            if still_using is not None:
                still_using.result()
            LOANS.settle(buf)  # views of it lent to a later stage are written by now
            free.append(buf)
            submit()
