"""What the cloud targets share: URL parsing, and a Sink that cuts the stream into parts and
uploads them from a small thread pool with a bound on the parts held in memory.

Memory stays bounded: one part being filled plus at most ``max_inflight`` parts queued or being
uploaded. The writer blocks when that many are outstanding, so a fast pipeline cannot outrun a
slow network.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

from hypersdk.errors import InvalidParameterError, TargetError
from hypersdk.io import ZeroBytesSink
from providers.base import ObjectWriter

MiB = 1024 * 1024


def split_url(url: str, schemes: tuple[str, ...]) -> tuple[str, str]:
    """``scheme://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes or not parts.netloc:
        raise InvalidParameterError(f"expected {schemes[0]}://bucket[/prefix], got {url!r}")
    if parts.query or parts.fragment:
        raise InvalidParameterError(f"{url!r}: pass options as keyword arguments, not in the URL")
    return parts.netloc, unquote(parts.path).strip("/")


def join_key(prefix: str, key: str) -> str:
    """Full object name of ``key`` under ``prefix``; rejects keys that would escape it."""
    key = key.lstrip("/")
    if not key or any(p in ("..", ".") for p in key.split("/")):
        raise InvalidParameterError(f"bad object key {key!r}")
    return f"{prefix}/{key}" if prefix else key


def strip_prefix(prefix: str, name: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def choose(value: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    """``value`` matched case-insensitively against ``allowed``, in its canonical spelling."""
    if value is None:
        return None
    for option in allowed:
        if option.lower() == value.lower():
            return option
    raise InvalidParameterError(f"{what} {value!r} is not one of {', '.join(allowed)}")


class RangedObjectReader:
    """RangeReader over one stored object: each read is one ranged GET; past the end reads zeros.

    Subclasses fetch bytes ``[offset, end)`` of the object, ``end`` never past its size.
    """

    def __init__(self, name: str, size: int):
        self.name = name  # safe to show: scheme://bucket/key
        self.size = size

    @abstractmethod
    def _fetch(self, offset: int, end: int) -> bytes: ...

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return bytes(max(0, length))
        data = self._fetch(offset, min(offset + length, self.size))
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        """Nothing to release: each read is its own request on the target's pooled client."""


class PartUploadWriter(ZeroBytesSink, ObjectWriter):
    """ObjectWriter streaming parts to a pool. Subclasses say how to upload and publish.

    Objects smaller than one part go through ``_put_single`` (one request, nothing to clean up).
    """

    def __init__(self, name: str, part_size: int, workers: int = 4, max_inflight: int = 4):
        self.name = name  # safe to show: scheme://bucket/key
        self.part_size = part_size
        self._buf = bytearray(part_size)
        self._fill = 0
        self._pos = 0
        self._next_part = 1
        self._futures: list[Future] = []
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._state = "open"  # open -> committed | aborted
        self._error: BaseException | None = None

    # --- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def _begin(self) -> None:
        """Start the multipart session (called before the first part)."""

    @abstractmethod
    def _upload_part(self, number: int, data: bytes | bytearray) -> object:
        """Upload part ``number`` (1-based); the result is handed to ``_complete``."""

    @abstractmethod
    def _complete(self, results: list) -> None:
        """Publish the object from the parts' results, in order."""

    @abstractmethod
    def _put_single(self, data: bytes) -> None:
        """Publish a small object in one request."""

    @abstractmethod
    def _cancel(self) -> None:
        """Drop the multipart session so no part stays behind (best effort, must not raise)."""

    def _next_part_size(self, number: int) -> int:
        """Size of part ``number``; override to grow parts when the total size is unknown."""
        return self.part_size

    # --- Sink -----------------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            room = len(self._buf) - self._fill
            n = min(room, len(view))
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(self._buf):
                self._flush_part()
        self._pos += total
        return total

    def tell(self) -> int:
        return self._pos

    # --- parts ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise TargetError(f"{self.name}: writer is already {self._state}")
        if self._error is not None:
            raise self._error

    def _flush_part(self) -> None:
        if self._pool is None:
            self._begin()
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="part-upload")
        # a full buffer is handed over as is (no copy); only a short last part is copied
        data = self._buf if self._fill == len(self._buf) else bytes(self._buf[: self._fill])
        number = self._next_part
        self._next_part += 1
        self._buf = bytearray(self._next_part_size(self._next_part))
        self._fill = 0
        self._slots.acquire()  # bounded memory: wait for a free slot
        if self._error is not None:
            self._slots.release()
            raise self._error
        fut = self._pool.submit(self._upload_part, number, data)
        fut.add_done_callback(self._part_done)
        self._futures.append(fut)

    def _part_done(self, fut: Future) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()

    def commit(self) -> None:
        if self._state == "committed":
            return
        self._check_open()
        try:
            if self._pool is None:  # everything fits in one part
                self._put_single(bytes(self._buf[: self._fill]))
            else:
                if self._fill or self._next_part == 1:
                    self._flush_part()
                results = [f.result() for f in self._futures]
                self._complete(results)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._shutdown()

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        for f in self._futures:
            f.cancel()
        started = self._pool is not None
        self._shutdown()  # waits for parts already on the wire, so cancel sees all of them
        if started:
            self._cancel()
        self._buf = bytearray()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures = []
