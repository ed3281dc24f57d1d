"""Pipeline stages and the bounded in-memory streams between them.

An export runs four stages at once, each on its own thread: **download** (every read of the
source disk), **convert** (the format writer), **encrypt** (when asked) and **upload** (every
write to the target). They meet in bounded in-memory structures, so nothing is staged on disk
and memory stays at a few buffers whatever the disk size:

- download -> convert: the convert stage's reads are jobs (``JobQueue``) that the download
  stage's workers run into the reader's own ring of buffers (``StagedSource``): no copy.
- convert -> encrypt -> upload: ``Pipe``, a ring of 4 MiB buffers the producer copies into and
  the next stage drains, in order, into its sink.

Who runs a stage is the caller's business: plain threads (``hypersdk.pipeline``) or one
Prefect task per stage (tasks/transfer.py), so the flow graph shows the stages themselves.
Each stage keeps its own statistics: bytes, busy seconds, and when it started and ended.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from hypersdk import cancel
from hypersdk.errors import HyperSDKError
from hypersdk.io import IO_CHUNK, LOANS, Sink, aligned_buffer


class StageAborted(HyperSDKError):
    """A stage stopped because another stage of the same stream failed."""


@dataclass
class StageStats:
    """What one stage did: ``bytes`` through it, ``busy`` seconds of its own work (waiting for
    the neighbouring stages not counted), and its start and end (``time.monotonic``)."""

    name: str
    bytes: int = 0
    busy: float = 0.0
    started: float | None = None
    ended: float | None = None

    def begin(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def finish(self) -> None:
        self.ended = time.monotonic()

    @property
    def wall(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.busy / 1e6 if self.busy > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"bytes": self.bytes, "seconds": self.busy, "wall": self.wall}


class _Closed:
    """Marker put on a queue when its producer is done."""


_CLOSED = _Closed()


def _nothing_to_return() -> None:
    """The loan of immutable bytes: nothing to give back."""


class _NotNow(Exception):
    """A non-blocking acquire that would block."""


def _try(sem: threading.Semaphore) -> Callable[[], bool]:
    def now() -> bool:
        if not sem.acquire(blocking=False):
            raise _NotNow
        return True

    return now


class JobQueue:
    """Work handed to a stage's workers (the download stage): ``submit`` from any thread,
    ``work`` in each worker until ``close``. Results travel back in futures."""

    def __init__(self, stats: StageStats):
        self.stats = stats
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> Future:
        fut: Future = Future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._jobs.put((fut, fn, args, nbytes))
        return fut

    def work(self) -> None:
        """Run jobs until the queue is closed (or aborted); several workers may share it."""
        self.stats.begin()
        while True:
            item = self._jobs.get()
            if item is _CLOSED:
                self._jobs.put(_CLOSED)  # wake the next worker too
                break
            fut, fn, args, nbytes = item
            if self._error is None and cancel.requested():  # a stopped run reads no more
                self._error = cancel.error()
            if self._error is not None or not fut.set_running_or_notify_cancel():
                if not fut.done():
                    fut.set_exception(self._error or StageAborted("stream stopped"))
                continue
            started = time.perf_counter()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to whoever waits for it
                fut.set_exception(exc)
                continue
            with self._lock:
                self.stats.busy += time.perf_counter() - started
                self.stats.bytes += nbytes
            fut.set_result(result)
        self.stats.finish()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._jobs.put(_CLOSED)

    def abort(self, exc: BaseException) -> None:
        """Fail every pending job and stop the workers."""
        if self._error is None:
            self._error = exc
        self._jobs.put(_CLOSED)


class StagedSource:
    """A source whose reads run on the download stage's workers (any Readable inside).

    ``submit_readinto`` is what ``hypersdk.io.read_pieces`` uses when a source offers it: the
    read lands in the caller's ring buffer, on a download worker, with no copy."""

    def __init__(self, inner: Any, jobs: JobQueue):
        self._inner = inner
        self._jobs = jobs
        self.size = inner.size
        self.name = getattr(inner, "name", "<source>")

    def submit_readinto(self, offset: int, view: memoryview) -> Future:
        readinto = getattr(self._inner, "readinto", None)
        if readinto is not None:
            return self._jobs.submit(readinto, offset, view, nbytes=len(view))
        return self._jobs.submit(self._copy_into, offset, view, nbytes=len(view))

    def _copy_into(self, offset: int, view: memoryview) -> None:
        view[:] = self._inner.read(offset, len(view))

    def readinto(self, offset: int, view: memoryview):
        return self.submit_readinto(offset, view).result()

    def read(self, offset: int, length: int) -> bytes:
        return self._jobs.submit(self._inner.read, offset, length, nbytes=length).result()


class Pipe:
    """A bounded in-memory byte stream between two stages.

    The producer uses it as a Sink (``write``, ``write_zeros``, ``tell``, then ``close_write``);
    the consumer's stage runs ``drain(sink)``, which writes everything, in order, into the next
    sink. Large writes are borrowed, not copied, when that is safe: immutable ``bytes``, and
    views of ``read_pieces`` ring buffers, whose refill waits until the loan is back
    (``hypersdk.io.LOANS``). Everything else is copied into a ring of ``buffers`` page-aligned
    buffers. Either way the bytes in flight are bounded (the producer waits when the consumer
    is that far behind). A failed consumer keeps draining (discarding, returning loans) so the
    producer never blocks, and the producer's next write raises the consumer's error.
    """

    BORROW_MIN = 256 * 1024  # smaller writes are cheaper to copy than to hand over

    def __init__(self, name: str, buffers: int = 4, size: int = IO_CHUNK):
        self.name = name
        self._size = size
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(aligned_buffer(size))
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._buf: memoryview | None = None
        self._fill = 0
        self._pos = 0
        self._lent = threading.Semaphore(buffers)  # borrowed writes in flight
        self.producer_wait = 0.0  # seconds the producer waited for the consumer
        self.error: BaseException | None = None
        self._aborted = False

    # -- producer side (a Sink) ---------------------------------------------------------------
    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        cancel.check()  # once per write: a stopped run converts no more

    def _waiting(self, get: Callable[[], Any], now: Callable[[], Any]) -> Any:
        try:
            return now()
        except (queue.Empty, _NotNow):
            started = time.perf_counter()
            got = get()
            self.producer_wait += time.perf_counter() - started
            return got

    def _take(self) -> memoryview:
        return self._waiting(self._free.get, self._free.get_nowait)

    def _send(self) -> None:
        if self._fill:
            self._items.put((self._buf, self._fill, None))
            self._buf, self._fill = None, 0

    def _borrow(self, view: memoryview) -> bool:
        """Hand ``view`` over without a copy if its memory cannot change under the consumer."""
        if len(view) < self.BORROW_MIN:
            return False
        back = _nothing_to_return if isinstance(view.obj, bytes) else LOANS.lend(view)
        if back is None:
            return False
        self._send()
        self._waiting(self._lent.acquire, _try(self._lent))
        self._items.put((view, len(view), back))
        return True

    def write(self, data: bytes | memoryview) -> int:
        self._check()
        view = memoryview(data).cast("B")
        n = len(view)
        if self._borrow(view):
            self._pos += n
            return n
        while view:
            if self._buf is None:
                self._buf = self._take()
            take = min(len(view), self._size - self._fill)
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self._size:
                self._send()
        self._pos += n
        return n

    def write_zeros(self, length: int) -> None:
        self._check()
        if length > 0:
            self._send()
            self._items.put((None, length, None))
            self._pos += length

    def tell(self) -> int:
        return self._pos

    def close_write(self) -> None:
        """The producer is done: the consumer's ``drain`` returns after the last byte."""
        self._check()
        self._send()
        self._items.put(_CLOSED)

    def abort(self, exc: BaseException) -> None:
        """The producer failed: the consumer stops (``drain`` raises StageAborted)."""
        self._aborted = True
        if self.error is None:
            self.error = exc
        self._items.put(_CLOSED)

    # -- consumer side ------------------------------------------------------------------------
    def drain(self, sink: Sink, stats: StageStats) -> None:
        """Write the stream into ``sink`` until the producer closes it; the time spent inside
        ``sink`` is this stage's busy time."""
        stats.begin()
        failed: BaseException | None = None
        while True:
            item = self._items.get()
            if item is _CLOSED:
                break
            buf, n, back = item
            if failed is None:
                started = time.perf_counter()
                try:
                    cancel.check()  # once per block: a stopped run uploads no more
                    if buf is None:
                        sink.write_zeros(n)
                    else:
                        sink.write(buf[:n])
                except BaseException as exc:
                    failed = exc
                    if self.error is None:
                        self.error = exc
                stats.busy += time.perf_counter() - started
                stats.bytes += n
            if buf is None:
                continue
            if back is None:
                self._free.put(buf)  # one of our buffers
            else:  # borrowed: give it back
                self._lent.release()
                back()
        stats.finish()
        if failed is not None:
            raise failed
        if self._aborted:
            raise StageAborted(f"stopped: {self.error}")
