"""Block-hash maps: change tracking for sources without native CBT, and zero detection.

A BlockMap holds one 64-bit xxh3 hash per block of a disk (0 means "all zeros"). Two maps of the
same disk diff into the changed-extent list; a map alone gives the non-zero extents a format writer
needs. xxh3 runs at ~10 GB/s here, so building a map costs little more than reading the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from hypersdk.errors import FormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.io import IO_CHUNK, RangeReader

DEFAULT_BLOCK = 64 * 1024
_MAGIC = b"HSDKBMAP"
_ZERO_BLOCKS: dict[int, bytes] = {}


def zero_block(size: int) -> bytes:
    block = _ZERO_BLOCKS.get(size)
    if block is None:
        block = _ZERO_BLOCKS[size] = bytes(size)
    return block


def block_hash(data: bytes) -> int:
    """Hash of one block; 0 is reserved for an all-zero block."""
    if data == zero_block(len(data)):
        return 0
    return xxhash.xxh3_64_intdigest(data) or 1


def nonzero_extents(data: bytes, base: int, block: int) -> Iterator[Extent]:
    """Data extents inside ``data`` (which starts at disk offset ``base``), at ``block`` granularity."""
    start = None
    for pos in range(0, len(data), block):
        piece = data[pos : pos + block]
        if piece == zero_block(len(piece)):
            if start is not None:
                yield Extent(base + start, pos - start)
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield Extent(base + start, len(data) - start)


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

        Reads run one chunk ahead in a thread (pread releases the GIL) so I/O and hashing overlap.
        """
        size = reader.size
        hashes = np.zeros(-(-size // block_size), dtype=np.uint64)
        allocated = allocated if allocated is not None else ExtentMap.full(size)
        chunk = max(block_size, IO_CHUNK // block_size * block_size)
        pieces = list(allocated.aligned(block_size).split(chunk))
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = (
                pool.submit(reader.read, pieces[0].offset, pieces[0].length) if pieces else None
            )
            for i, piece in enumerate(pieces):
                data = pending.result()
                if i + 1 < len(pieces):
                    nxt = pieces[i + 1]
                    pending = pool.submit(reader.read, nxt.offset, nxt.length)
                first = piece.offset // block_size
                for j, pos in enumerate(range(0, len(data), block_size)):
                    hashes[first + j] = block_hash(data[pos : pos + block_size])
                if progress:
                    progress(len(data))
        return cls(size, block_size, hashes)

    # -- queries ------------------------------------------------------------------------------
    def _extents(self, mask: np.ndarray, zero_mask: np.ndarray | None = None) -> ExtentMap:
        bs = self.block_size
        out = []
        if zero_mask is None:
            for first, count in _runs(mask):
                start = first * bs
                out.append(Extent(start, min(self.size, (first + count) * bs) - start))
        else:
            for zero in (False, True):
                for first, count in _runs(mask & (zero_mask == zero)):
                    start = first * bs
                    out.append(Extent(start, min(self.size, (first + count) * bs) - start, zero))
        return ExtentMap(self.size, out)

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
        """Write atomically: a temp file, fsync, rename."""
        path = os.fspath(path)
        meta = json.dumps({"size": self.size, "block_size": self.block_size, "hash": "xxh3_64"})
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", len(meta)) + meta.encode())
            f.write(self.hashes.astype("<u8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockMap:
        path = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:8] != _MAGIC:
                raise FormatError(path, "not a hypersdk block map")
            (meta_len,) = struct.unpack("<I", head[8:])
            if meta_len > 4096:
                raise FormatError(path, "block map header too large")
            try:
                meta = json.loads(f.read(meta_len))
                size, bs = int(meta["size"]), int(meta["block_size"])
            except (ValueError, KeyError, TypeError):
                raise FormatError(path, "block map header is corrupt") from None
            count = -(-size // bs) if bs > 0 else -1
            raw = f.read()
        if count < 0 or len(raw) != count * 8:
            raise FormatError(path, "block map is truncated or has the wrong length")
        return cls(size, bs, np.frombuffer(raw, dtype="<u8").astype(np.uint64))
