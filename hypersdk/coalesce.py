"""Fast reads of a stored object: small random reads served from large aligned blocks.

Format readers read a stored image in small pieces (a 64 KiB qcow2 cluster, an L2 table, a 4 MiB
hash piece); on an object store each of those is one ranged GET, so verifying or restoring a
1 GiB object cost well over a thousand requests. ``CoalescingReader`` fetches the object in
aligned blocks (8 MiB by default, the last one short), keeps the most recently used blocks, and
once it sees sequential access fetches the next blocks ahead on a small thread pool, several
requests in flight. A whole-object pass then costs about size / block requests.

Memory is bounded: at most ``cache_blocks`` blocks are held (read, being fetched or fetched
ahead), plus, per reader thread, the block it is copying from (evicted meanwhile) or one it
had to fetch while every held block was still in flight. With the defaults that is
8 x 8 MiB = 64 MiB, plus at most 8 MiB per concurrent reader thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from hypersdk.errors import HyperSDKError, InvalidParameterError, TargetError
from hypersdk.io import RangeReader

MiB = 1024 * 1024
DEFAULT_BLOCK = 8 * MiB
_RECENT = 8  # demand-read blocks remembered for sequential detection (several reader threads)


class _Block:
    """One block of the object: fetched by whoever claims it first (a reader or the pool)."""

    __slots__ = ("claimed", "future")

    def __init__(self) -> None:
        self.future: Future = Future()
        self.claimed = False


class CoalescingReader:
    """RangeReader over ``inner`` that reads it only in whole aligned blocks (see the module).

    Thread-safe: any number of threads may read at once; a block is fetched once however many
    threads want it. A failed fetch raises its typed error on the read that needs the block (a
    fetch ahead that fails costs nothing unless the block is read) and is forgotten, so the
    next read of that block tries again. ``close`` closes ``inner``.
    """

    def __init__(
        self,
        inner: RangeReader,
        block: int = DEFAULT_BLOCK,
        cache_blocks: int = 8,
        ahead: int = 4,
        workers: int = 4,
    ):
        if block < 4096 or cache_blocks < 1 or workers < 1 or not 0 <= ahead < cache_blocks:
            raise InvalidParameterError(
                "coalescing reader: need block >= 4096, cache_blocks >= 1, workers >= 1 and "
                f"0 <= ahead < cache_blocks (got {block}, {cache_blocks}, {ahead}, {workers})"
            )
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.block = block
        self.cache_blocks = cache_blocks
        self.ahead = ahead
        self.workers = workers
        self.requests = 0  # reads made of ``inner`` (one per block fetched)
        self._count = -(-self.size // block)
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._recent: deque[int] = deque(maxlen=_RECENT)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # --- RangeReader ----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if offset < 0:
            raise InvalidParameterError(f"{self.name}: negative read offset {offset}")
        pieces = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            index = pos // self.block
            data = self._get(index)
            start = pos - index * self.block
            take = min(len(data) - start, end - pos)
            pieces.append(data if take == len(data) else memoryview(data)[start : start + take])
            pos += take
        if end < offset + length:  # past the end reads as zeros, as every RangeReader here
            pieces.append(bytes(offset + length - max(end, offset)))
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (zeros past the end): one copy per byte,
        straight from the cached block."""
        view = memoryview(view).cast("B")
        if offset < 0:
            raise InvalidParameterError(f"{self.name}: negative read offset {offset}")
        want = len(view)
        done, end = 0, min(offset + want, self.size)
        while offset + done < end:
            pos = offset + done
            index = pos // self.block
            data = self._get(index)
            start = pos - index * self.block
            take = min(len(data) - start, end - pos)
            view[done : done + take] = memoryview(data)[start : start + take]
            done += take
        if done < want:
            view[done:] = bytes(want - done)

    def close(self) -> None:
        """Stop fetching (blocks not yet claimed are cancelled: a thread waiting for one gets
        TargetError), drop the cache and close ``inner``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for entry in self._blocks.values():
                if not entry.claimed:
                    entry.claimed = True
                    entry.future.cancel()
            self._blocks.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.inner.close()

    def __enter__(self) -> CoalescingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- blocks ---------------------------------------------------------------------------
    def _get(self, index: int) -> bytes:
        """Block ``index``'s bytes: from the cache, from a fetch under way, or fetched here."""
        with self._lock:
            if self._closed:
                raise TargetError(f"{self.name}: read after the reader was closed")
            entry = self._blocks.get(index)
            if entry is None:
                entry = self._insert(index, demand=True)
            else:
                self._blocks.move_to_end(index)
            mine = not entry.claimed  # not started yet (maybe queued ahead): fetch it here
            entry.claimed = True
            sequential = index - 1 in self._recent
            if not self._recent or self._recent[-1] != index:
                self._recent.append(index)
            if sequential and self.ahead:
                self._fetch_ahead(index)
        if mine:
            self._fill(index, entry)
        return self._result(index, entry)

    def _insert(self, index: int, demand: bool) -> _Block | None:
        """A new entry for ``index``, evicting the least recently used finished blocks to stay
        within ``cache_blocks``. A read ahead that would need to evict a block still being
        fetched is not started (None); a demand read always goes ahead."""
        while len(self._blocks) >= self.cache_blocks:
            victim = next((i for i, e in self._blocks.items() if e.future.done()), None)
            if victim is None:
                if not demand:
                    return None
                break
            del self._blocks[victim]
        entry = _Block()
        self._blocks[index] = entry
        return entry

    def _fetch_ahead(self, index: int) -> None:
        """Queue the ``ahead`` blocks after ``index`` that are neither cached nor under way."""
        for nxt in range(index + 1, min(index + 1 + self.ahead, self._count)):
            if nxt in self._blocks:
                continue
            entry = self._insert(nxt, demand=False)
            if entry is None:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="read-block")
            # by index, not entry: a queued job must not keep an evicted block alive
            self._pool.submit(self._fill_ahead, nxt)

    def _fill_ahead(self, index: int) -> None:
        with self._lock:
            entry = self._blocks.get(index)
            if entry is None or entry.claimed:  # evicted, or a reader got there first
                return
            entry.claimed = True
        self._fill(index, entry)

    def _fill(self, index: int, entry: _Block) -> None:
        """Fetch block ``index`` into ``entry`` (its claimant only); never leaves it pending."""
        offset = index * self.block
        length = min(self.block, self.size - offset)
        with self._lock:
            self.requests += 1
        try:
            data = self.inner.read(offset, length)
            if len(data) != length:
                raise TargetError(
                    f"{self.name}: read of {length} bytes at {offset} returned {len(data)}"
                )
            entry.future.set_result(bytes(data))
        except BaseException as exc:  # handed to whoever reads the block
            entry.future.set_exception(exc)

    def _result(self, index: int, entry: _Block) -> bytes:
        try:
            return entry.future.result()
        except CancelledError:
            raise TargetError(f"{self.name}: the reader was closed during a read") from None
        except BaseException as exc:
            with self._lock:  # forget the failure: the next read of the block tries again
                if self._blocks.get(index) is entry:
                    del self._blocks[index]
            if isinstance(exc, HyperSDKError):
                raise exc.with_traceback(None) from None
            if not isinstance(exc, Exception):
                raise
            offset = index * self.block
            raise TargetError(
                f"{self.name}: read at {offset} failed: {type(exc).__name__}: {exc}"
            ) from None
