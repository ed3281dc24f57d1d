"""EBS direct APIs: which blocks a snapshot holds or changed, and the blocks' bytes.

A snapshot is a list of 512 KiB blocks (``BlockSize``); a block it does not list reads as zeros.
``ListSnapshotBlocks`` gives a full export's extents, ``ListChangedBlocks(First, Second)`` an
incremental's, both paginated. ``SnapshotReader`` is the RangeReader over a snapshot: it fetches
blocks with ``GetSnapshotBlock``, several in flight (a thread pool of ``workers``), ahead along the
planned extents, verifies each against the base64 SHA-256 ``Checksum`` EBS sends with it, and
retries throttling with backoff (client.with_backoff). Block tokens are listed a page at a time
as the reads move on, so a large snapshot never holds all its tokens at once.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from hypersdk.errors import SourceError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from providers.aws.client import Settings, aws_errors, with_backoff
from providers.aws.errors import BlockChecksumError

BLOCK_SIZE = 512 * 1024  # what EBS uses for every snapshot
PAGE = 10000  # MaxResults of the list calls (EBS's maximum)
MAX_BLOCK = 16 * 1024 * 1024
_RECENT = 4  # blocks read last, kept for reads that end or start inside them


def _check_block_size(value: object, snapshot: str) -> int:
    try:
        size = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        size = 0
    if size < 4096 or size > MAX_BLOCK or size & (size - 1):
        raise SourceError(f"EBS snapshot {snapshot}: unusable BlockSize {value!r}")
    return size


class Listing:
    """One pass over a list call's pages: the blocks (index, token, zero) in ascending order,
    with the snapshot's volume size (bytes) and block size known after the first page."""

    def __init__(self, settings: Settings, snapshot: str, since: str | None = None, start: int = 0):
        self.s = settings
        self.snapshot = snapshot
        self.since = since
        self.start = start
        self.volume_bytes = 0
        self.block_size = BLOCK_SIZE
        self.next_start: int | None = None  # after one page: where the next page starts

    def _call(self, token: str | None) -> dict:
        ebs = self.s.client("ebs")
        kwargs: dict = {"MaxResults": PAGE}
        if token:
            kwargs["NextToken"] = token
        elif self.start:
            kwargs["StartingBlockIndex"] = self.start
        if self.since is None:
            what = f"EBS ListSnapshotBlocks {self.snapshot}"
            return with_backoff(
                lambda: ebs.list_snapshot_blocks(SnapshotId=self.snapshot, **kwargs),
                what,
                self.s.attempts,
                self.s.backoff,
            )
        what = f"EBS ListChangedBlocks {self.since} -> {self.snapshot}"
        return with_backoff(
            lambda: ebs.list_changed_blocks(
                FirstSnapshotId=self.since, SecondSnapshotId=self.snapshot, **kwargs
            ),
            what,
            self.s.attempts,
            self.s.backoff,
        )

    def _page(self, answer: dict) -> list[tuple[int, str | None]]:
        self.volume_bytes = int(answer.get("VolumeSize", 0) or 0) * 1024**3
        self.block_size = _check_block_size(answer.get("BlockSize", BLOCK_SIZE), self.snapshot)
        if self.since is None:
            return [(int(b["BlockIndex"]), b.get("BlockToken")) for b in answer.get("Blocks", [])]
        # a changed block without a second token is not in the second snapshot: zeros there
        return [
            (int(b["BlockIndex"]), b.get("SecondBlockToken"))
            for b in answer.get("ChangedBlocks", [])
        ]

    def pages(self, first_only: bool = False) -> Iterator[list[tuple[int, str | None]]]:
        token: str | None = None
        last = -1
        seen: set[str] = set()
        while True:
            answer = self._call(token)
            page = self._page(answer)
            for index, _ in page:
                if index <= last:
                    raise SourceError(
                        f"EBS snapshot {self.snapshot}: block list out of order at {index}"
                    )
                last = index
            token = answer.get("NextToken")
            self.next_start = last + 1 if token else None  # known before the page is used
            yield page
            if not token or first_only:
                return
            if token in seen:
                raise SourceError(f"EBS snapshot {self.snapshot}: block list pages loop")
            seen.add(token)


def block_extents(listing: Listing, size: int) -> ExtentMap:
    """The extents of every block a listing names (data, or zero where the block is gone)."""
    found = ExtentCollector(size)
    for page in listing.pages():
        bs = listing.block_size
        for index, token in page:
            offset = index * bs
            if offset >= size:
                raise SourceError(
                    f"EBS snapshot {listing.snapshot}: block {index} beyond the volume's end"
                )
            found.add(offset, min(bs, size - offset), zero=token is None)
    return found.build()


def verify_block(snapshot: str, index: int, data: bytes, checksum: str | None, algo: str | None):
    """SHA-256 of ``data`` against EBS's base64 checksum; BlockChecksumError naming the block."""
    if (algo or "SHA256").upper() != "SHA256" or not checksum:
        raise BlockChecksumError(
            f"EBS snapshot {snapshot}, block {index}: no SHA-256 checksum sent with the data"
        )
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    if digest != checksum:
        raise BlockChecksumError(
            f"EBS snapshot {snapshot}, block {index} (offset {index * BLOCK_SIZE}): checksum "
            f"mismatch (EBS says {checksum[:44]}, the data hashes to {digest}): data refused"
        )


def get_block(settings: Settings, snapshot: str, index: int, token: str, block_size: int) -> bytes:
    """One block's bytes, verified, after throttling retries."""
    ebs = settings.client("ebs")
    what = f"EBS GetSnapshotBlock {snapshot} block {index}"

    def call() -> tuple[bytes, str | None, str | None, int]:
        answer = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=index, BlockToken=token)
        body = answer["BlockData"]
        try:
            data = body.read()
        finally:
            body.close()
        return (
            data,
            answer.get("Checksum"),
            answer.get("ChecksumAlgorithm"),
            answer.get("DataLength", len(data)),
        )

    data, checksum, algo, length = with_backoff(call, what, settings.attempts, settings.backoff)
    if length != len(data) or len(data) != block_size:
        raise BlockChecksumError(
            f"EBS snapshot {snapshot}, block {index}: {len(data)} bytes received, "
            f"{length} announced, {block_size} expected"
        )
    verify_block(snapshot, index, data, checksum, algo)
    return data


class SnapshotReader:
    """Random reads of an EBS snapshot (a RangeReader): listed blocks come from GetSnapshotBlock,
    the rest are zeros. ``prefetch(extents)`` fetches those extents' blocks ahead, in order,
    ``workers`` at a time; reads outside them fetch what they need at once (in parallel too)."""

    def __init__(
        self,
        settings: Settings,
        snapshot: str,
        size: int,
        name: str | None = None,
        progress: Callable[[int], None] | None = None,
        fetch: Callable[[int, str], bytes] | None = None,
    ):
        self.s = settings
        self.snapshot = snapshot
        self.size = size
        self.name = name or f"ebs://{settings.region}/{snapshot}"
        self.block_size = BLOCK_SIZE
        self.bytes_fetched = 0
        self.blocks_fetched = 0
        self._progress = progress
        self._fetch_fn = fetch or (
            lambda i, tok: get_block(self.s, self.snapshot, i, tok, self.block_size)
        )
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="ebs-block")
        self._window = max(8, 2 * settings.workers)
        self._futures: dict[int, Future] = {}
        self._done: OrderedDict[int, bytes] = OrderedDict()
        self._plan: Iterator[int] = iter(())
        self._peek: int | None = None
        self._failure: BaseException | None = None
        # block tokens of one listing page: indexes [lo, hi) are known, absent ones are zeros
        self._tokens: dict[int, str | None] = {}
        self._lo = self._hi = 0
        self._closed = False

    # -- tokens ------------------------------------------------------------------------------
    def _token(self, index: int) -> str | None:
        """The block's token, or None if the snapshot does not hold it (reads as zeros)."""
        if not self._lo <= index < self._hi:
            listing = Listing(self.s, self.snapshot, start=index)
            page = next(listing.pages(first_only=True))
            self.block_size = listing.block_size
            self._tokens = dict(page)
            self._lo = index
            end = -(-self.size // self.block_size)
            self._hi = listing.next_start if listing.next_start is not None else end
            self._hi = max(self._hi, index + 1)
        return self._tokens.get(index)

    def allocated(self) -> ExtentMap:
        """The blocks the snapshot holds (for ``hyperctl info`` and ``convert``)."""
        return block_extents(Listing(self.s, self.snapshot), self.size)

    # -- fetching ----------------------------------------------------------------------------
    def _fetch(self, index: int, token: str) -> bytes:
        data = self._fetch_fn(index, token)
        with self._lock:
            self.bytes_fetched += len(data)
            self.blocks_fetched += 1
        if self._progress:
            self._progress(len(data))
        return data

    def _submit(self, index: int) -> Future | None:
        """Start fetching ``index`` (None if the snapshot does not hold it). Caller holds lock."""
        if index in self._futures:
            return self._futures[index]
        token = self._token(index)
        if token is None:
            return None
        fut = self._pool.submit(self._fetch, index, token)
        self._futures[index] = fut
        return fut

    def _fill(self) -> None:
        """Keep up to ``window`` planned blocks in flight or waiting to be read."""
        while len(self._futures) < self._window:
            index = next(self._plan, None)
            if index is None:
                return
            if index not in self._done:
                self._submit(index)

    def prefetch(self, extents: Iterable[Extent]) -> None:
        bs = self.block_size

        def indexes() -> Iterator[int]:
            last = -1
            for e in extents:
                if e.zero or e.length <= 0:
                    continue
                for i in range(max(last + 1, e.offset // bs), -(-e.end // bs)):
                    last = i
                    yield i

        with self._lock:
            self._plan = indexes()
            self._fill()

    def _block(self, index: int) -> bytes | None:
        with self._lock:
            if index in self._done:
                self._done.move_to_end(index)
                return self._done[index]
            fut = self._futures.get(index) or self._submit(index)
        if fut is None:
            return None
        data = fut.result()
        with self._lock:
            self._futures.pop(index, None)
            self._done[index] = data
            while len(self._done) > _RECENT:
                self._done.popitem(last=False)
            self._fill()
        return data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(f"{self.name}: read {offset}+{length} beyond the end {self.size}")
        if self._closed:
            raise SourceError(f"{self.name}: read after close")
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs if length else offset // bs - 1
        with self._lock:  # the whole range in flight at once, not block after block
            for i in range(first, last + 1):
                if i not in self._done:
                    self._submit(i)
        out = bytearray(length)
        for i in range(first, last + 1):
            data = self._block(i)
            if data is None:
                continue
            start = max(offset, i * bs)
            end = min(offset + length, (i + 1) * bs)
            out[start - offset : end - offset] = data[start - i * bs : end - i * bs]
        return bytes(out)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._plan = iter(())
            for fut in self._futures.values():
                fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._futures.clear()
            self._done.clear()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BLOCK_SIZE",
    "Listing",
    "SnapshotReader",
    "block_extents",
    "get_block",
    "verify_block",
    "aws_errors",
]
