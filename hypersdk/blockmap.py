"""Block-hash maps: change tracking for sources without native CBT, and zero detection.

A BlockMap holds one 64-bit xxh3 hash per block of a disk (0 means "all zeros"). Two maps of the
same disk diff into the changed-extent list; a map alone gives the non-zero extents a format writer
needs. xxh3 runs at ~10 GB/s here, so building a map costs little more than reading the data.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
import xxhash

from hypersdk.atomic import atomic_file
from hypersdk.errors import FormatError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.io import IO_CHUNK, RangeReader, read_pieces

DEFAULT_BLOCK = 64 * 1024
MAX_BLOCKS = 4 * 1024 * 1024  # 32 MiB of hashes: a map stays small whatever the disk size


def block_size_for(size: int) -> int:
    """64 KiB blocks up to 256 GiB; beyond, the smallest power-of-two multiple that keeps the map
    within MAX_BLOCKS (256 KiB for 1 TiB, 2 MiB for 8 TiB), so memory is bounded by design: an
    incremental of a huge disk moves changes at a coarser grain instead."""
    block = DEFAULT_BLOCK
    while -(-size // block) > MAX_BLOCKS:
        block *= 2
    return block


_MAGIC = b"HSDKBMAP"
_HEAD = struct.Struct("<8sI")  # magic, length of the JSON header that follows
_MAX_META = 4096


def is_zero(data: bytes | memoryview) -> bool:
    return not np.frombuffer(data, dtype=np.uint8).any()


def zero_blocks(data: bytes | memoryview, block: int) -> np.ndarray:
    """One flag per ``block`` of ``data`` (the last may be short): True where it is all zeros.

    Vectorised over the whole buffer with no per-block Python work; a block whose first word is
    non-zero is settled by that one load, so data costs almost nothing and zeros run at memory
    speed.
    """
    n = len(data)
    full = n // block
    flags = np.empty(-(-n // block), dtype=bool)
    if full:
        if block % 8 == 0:
            words = np.frombuffer(data, dtype=np.uint64, count=full * block // 8)
            words = words.reshape(full, block // 8)
            # only blocks that start with a zero word can be zero: data blocks cost one load
            maybe = np.flatnonzero(words[:, 0] == 0)
            flags[:full] = False
            if len(maybe):
                flags[maybe] = words[maybe].max(axis=1) == 0
        else:
            raw = np.frombuffer(data, dtype=np.uint8, count=full * block)
            flags[:full] = raw.reshape(full, block).max(axis=1) == 0
    if n % block:
        tail = np.frombuffer(data, dtype=np.uint8, offset=full * block)
        flags[full] = not tail.any()
    return flags


def hash_blocks(hashes: np.ndarray, first: int, data: bytes | memoryview, block: int) -> int:
    """Store the xxh3 of each ``block`` of ``data`` at ``hashes[first:]`` (0 for an all-zero
    block, never 0 otherwise); returns how many blocks that was."""
    zero = zero_blocks(data, block)
    xxh3 = xxhash.xxh3_64_intdigest
    for j in np.flatnonzero(~zero).tolist():
        hashes[first + j] = xxh3(data[j * block : (j + 1) * block]) or 1
    hashes[first + np.flatnonzero(zero)] = 0
    return len(zero)


def nonzero_extents(data: bytes | memoryview, base: int, block: int) -> Iterator[Extent]:
    """Data extents inside ``data`` (which starts at disk offset ``base``), at ``block`` granularity."""
    n = len(data)
    for first, count in _runs(~zero_blocks(data, block)):
        start = first * block
        yield Extent(base + start, min(n, (first + count) * block) - start)


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of True in a boolean array."""
    if not mask.any():
        return
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for first, stop in zip(edges[0::2], edges[1::2], strict=True):
        yield int(first), int(stop - first)


class BlockMap:
    """Per-block hashes of a disk of ``size`` bytes."""

    def __init__(self, size: int, block_size: int, hashes: np.ndarray):
        expected = -(-size // block_size)
        if hashes.shape != (expected,):
            raise ValueError(f"block map needs {expected} hashes, got {hashes.shape}")
        self.size = size
        self.block_size = block_size
        self.hashes = hashes

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def scan(
        cls,
        reader: RangeReader,
        allocated: ExtentMap | None = None,
        block_size: int = DEFAULT_BLOCK,
        progress: Callable[[int], None] | None = None,
    ) -> BlockMap:
        """Read the allocated parts of ``reader`` once and hash every block.

        Reads run ahead in a thread into reused buffers (pread releases the GIL), so I/O,
        zero detection and hashing overlap and nothing is allocated per block.
        """
        size = reader.size
        hashes = np.zeros(-(-size // block_size), dtype=np.uint64)
        allocated = allocated if allocated is not None else ExtentMap.full(size)
        chunk = max(block_size, IO_CHUNK // block_size * block_size)
        pieces = allocated.aligned(block_size).split(chunk)
        for piece, view in read_pieces(reader, pieces, chunk=chunk, threads=2):
            hash_blocks(hashes, piece.offset // block_size, view, block_size)
            if progress:
                progress(len(view))
        return cls(size, block_size, hashes)

    # -- queries ------------------------------------------------------------------------------
    def _extents(self, mask: np.ndarray, zero_mask: np.ndarray | None = None) -> ExtentMap:
        bs, size = self.block_size, self.size
        runs: Iterator[tuple[int, int, bool]]
        if zero_mask is None:
            runs = ((first, count, False) for first, count in _runs(mask))
        else:  # data runs and zero runs, merged into disk order
            runs = heapq.merge(
                ((first, count, False) for first, count in _runs(mask & ~zero_mask)),
                ((first, count, True) for first, count in _runs(mask & zero_mask)),
            )
        found = ExtentCollector(size)
        for first, count, zero in runs:
            start = first * bs
            found.add(start, min(size, (first + count) * bs) - start, zero)
        return found.build()

    def data_extents(self) -> ExtentMap:
        """Extents holding non-zero data: what a full export must carry."""
        return self._extents(self.hashes != 0)

    def diff(self, older: BlockMap) -> ExtentMap:
        """Extents that changed since ``older``: data where new content is non-zero, zero otherwise."""
        if older.block_size != self.block_size:
            raise ValueError("block maps with different block sizes cannot be compared")
        old = older.hashes
        if len(old) < len(self.hashes):
            old = np.concatenate((old, np.zeros(len(self.hashes) - len(old), dtype=np.uint64)))
        old = old[: len(self.hashes)]
        changed = old != self.hashes
        return self._extents(changed, self.hashes == 0)

    @property
    def data_bytes(self) -> int:
        return self.data_extents().data_bytes

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Publish atomically through :func:`hypersdk.atomic.atomic_file`: a random temporary
        name created O_EXCL|O_NOFOLLOW (a planted file or symlink is never written through),
        fsync, rename over ``path`` (a symlink there is replaced, not followed). TargetError if
        it cannot be written."""
        if len(self.hashes) > MAX_BLOCKS:
            raise ValueError(
                f"block map of {len(self.hashes)} blocks: load() refuses over {MAX_BLOCKS}"
            )
        meta = json.dumps({"size": self.size, "block_size": self.block_size, "hash": "xxh3_64"})
        little = self.hashes if self.hashes.dtype == np.dtype("<u8") else self.hashes.astype("<u8")
        with atomic_file(path) as sink:
            sink.write(_HEAD.pack(_MAGIC, len(meta)) + meta.encode())
            sink.write(memoryview(np.ascontiguousarray(little)).cast("B"))  # no copy of a map

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockMap:
        """A saved map. FileNotFoundError if there is none; FormatError for anything else that is
        not a readable map: a symlink, a FIFO or device (opened non-blocking, so never a hang),
        a bad header, a length that does not match the header, more than MAX_BLOCKS blocks.
        Memory is bounded by the file's real size and MAX_BLOCKS, whatever the header says."""
        path = os.fspath(path)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FormatError(path, "block map is a symlink: refused") from None
            raise FormatError(path, f"cannot read block map: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                return cls._read(path, f)
        except OSError as exc:
            raise FormatError(path, f"cannot read block map: {exc.strerror}") from None

    @classmethod
    def _read(cls, path: str, f: BinaryIO) -> BlockMap:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, "block map is not a regular file: refused")
        head = _read_exact(f, _HEAD.size)
        if len(head) < _HEAD.size or head[:8] != _MAGIC:
            raise FormatError(path, "not a hypersdk block map")
        (meta_len,) = _HEAD.unpack(head)[1:]
        if meta_len > _MAX_META or _HEAD.size + meta_len > st.st_size:
            raise FormatError(path, "block map header is too large or truncated")
        try:
            meta = json.loads(_read_exact(f, meta_len))
            size, bs = meta["size"], meta["block_size"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            raise FormatError(path, "block map header is corrupt") from None
        if not all(type(v) is int for v in (size, bs)) or size < 0 or bs <= 0:
            raise FormatError(path, "block map header is corrupt")
        count = -(-size // bs)
        if count > MAX_BLOCKS:
            raise FormatError(path, f"block map of {count} blocks: more than {MAX_BLOCKS}")
        if st.st_size - _HEAD.size - meta_len != count * 8:
            raise FormatError(path, "block map is truncated or has the wrong length")
        hashes = np.empty(count, dtype="<u8")  # bounded: the size was checked against the file
        if _read_into(f, memoryview(hashes).cast("B")) != count * 8:  # shrunk since the fstat
            raise FormatError(path, "block map is truncated or has the wrong length")
        return cls(size, bs, hashes.astype(np.uint64, copy=False))


def _read_into(f: BinaryIO, buf: memoryview) -> int:
    """Fill ``buf`` from an unbuffered file; how many bytes that was (fewer only at its end)."""
    got = 0
    while got < len(buf):
        k = f.readinto(buf[got:])
        if not k:
            break
        got += k
    return got


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the file)."""
    buf = bytearray(n)
    return bytes(buf[: _read_into(f, memoryview(buf))])


class BlockMapBuilder:
    """A BlockMap built from the reads of a full export, so the data is read once, not twice.

    A full export reads every non-zero block of the disk (``expected``); blocks it never reads
    are zeros (hash 0). ``observe`` takes each read as it happens (any order, any thread, but
    not concurrently); ``result`` gives the map, or None when the reads did not line up with the
    blocks or missed an expected data block: the caller then scans instead of trusting a map
    that would hide changes.
    """

    def __init__(self, size: int, expected: ExtentMap, block_size: int = DEFAULT_BLOCK):
        n = -(-size // block_size)
        self.size = size
        self.block_size = block_size
        self.hashes = np.zeros(n, dtype=np.uint64)
        self._seen = np.zeros(n, dtype=bool)
        self._expected = np.zeros(n, dtype=bool)
        for e in expected.data():
            self._expected[e.offset // block_size : -(-e.end // block_size)] = True
        self._broken = False

    def observe(self, offset: int, data: bytes | memoryview) -> None:
        bs, n = self.block_size, len(data)
        if offset % bs or (n % bs and offset + n != self.size) or offset + n > self.size:
            self._broken = True  # not whole blocks: leave it to a scan
            return
        first = offset // bs
        self._seen[first : first + hash_blocks(self.hashes, first, data, bs)] = True

    def result(self) -> BlockMap | None:
        if self._broken or bool((self._expected & ~self._seen).any()):
            return None
        return BlockMap(self.size, self.block_size, self.hashes)
