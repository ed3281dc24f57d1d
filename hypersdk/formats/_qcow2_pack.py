"""QCOW2 compressed-mode packing: where each data cluster lands once its compressed size is known,
and the spool that holds the compressed bytes between the sizing pass and the emit pass.

Compressed clusters are packed back to back at byte granularity, as qemu does; a cluster that does
not shrink is stored uncompressed at the next cluster boundary. Offsets are computed in vectorised
chunks (``PACK_CHUNK`` clusters at a time), so nothing per cluster but its size is kept.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from hypersdk.errors import FormatError, TargetError, TargetFullError
from hypersdk.formats import _qcow2_layout as L
from hypersdk.io import disk_full

PACK_CHUNK = 1 << 18  # clusters per vectorised packing step (a few MiB of temporaries)


def size_dtype(cs: int) -> type:
    return np.uint16 if cs <= 65536 else np.uint32  # a compressed size is < cs


class Spool:
    """Pass 1's output: each data cluster's compressed size (0: stored raw, read again from the
    source when emitted) and the compressed blobs back to back in an unlinked temporary file
    (TMPDIR; disk use = the compressed size). Nothing is left behind: the file has no name, and
    its space is freed on close, or when the process dies."""

    def __init__(self, count: int, cs: int):
        self.sizes = np.zeros(count, dtype=size_dtype(cs))
        self.length = 0
        try:
            # closed by close(), on every path of compress_pass and write_compressed
            self.file = tempfile.TemporaryFile(prefix="hypersdk-qcow2-")  # noqa: SIM115
        except OSError as exc:
            raise spool_error(exc) from None

    def append(self, blob: bytes) -> None:
        try:
            self.file.write(blob)
        except OSError as exc:
            raise spool_error(exc) from None
        self.length += len(blob)

    def seal(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise spool_error(exc) from None

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.file.fileno(), length, offset)
        if len(data) != length:
            raise FormatError(None, "qcow2 compression spool was truncated")
        return data

    def close(self) -> None:
        self.file.close()


def spool_error(exc: OSError) -> TargetError:
    where = tempfile.gettempdir()
    cls = TargetFullError if disk_full(exc) else TargetError
    return cls(
        f"qcow2 compression needs temporary space for the compressed clusters in {where} "
        f"(set TMPDIR elsewhere): {exc.strerror or exc}"
    )


def pack(sz: np.ndarray, pos: int, cs: int) -> tuple[np.ndarray, int]:
    """Relative host offsets of clusters with compressed sizes ``sz`` (0: raw), packed from byte
    ``pos``: blobs back to back, a raw cluster at the next cluster boundary. Vectorised: after a
    raw cluster the position is aligned again, so each stretch of blobs between raw clusters is a
    cumulative sum from that aligned point. Returns (offsets, position after the last)."""
    n = len(sz)
    s = sz.astype(np.int64)
    before = np.zeros(n + 1, dtype=np.int64)  # blob bytes before cluster i (of this chunk)
    np.cumsum(s, out=before[1:])
    raws = np.flatnonzero(s == 0)
    if not len(raws):
        return (pos + before[:n]).astype(np.uint64), pos + int(before[n])
    base = pos // cs * cs
    stretch = np.diff(before[raws], prepend=0)  # blob bytes since the previous raw cluster
    stretch[0] += pos - base
    after = base + np.cumsum(-(-stretch // cs) * cs + cs)  # aligned end of each raw cluster
    prev = np.searchsorted(raws, np.arange(n)) - 1  # the raw cluster before each cluster
    has = prev >= 0
    rel = np.where(has, after[prev] + before[:n] - before[raws[prev]], pos + before[:n])
    rel[raws] = after - cs
    return rel.astype(np.uint64), int(after[-1] + before[n] - before[raws[-1]])


class Packer:
    """Relative host offsets of compressed-mode data clusters, handed out in order (any count
    per call) from chunks packed ahead by ``pack``."""

    def __init__(self, sizes: np.ndarray, cs: int):
        self.sizes, self.cs = sizes, cs
        self.rank = 0  # next cluster handed out
        self._buf = np.zeros(0, dtype=np.uint64)
        self._at = 0  # rank of _buf[0]
        self._end = 0  # position after the packed chunks

    def _fill(self) -> None:
        self._at += len(self._buf)
        sz = self.sizes[self._at : self._at + PACK_CHUNK]
        self._buf, self._end = pack(sz, self._end, self.cs)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.rank
        count = min(count, len(self.sizes) - start)
        parts = []
        while self.rank < start + count:
            i = self.rank - self._at
            if i >= len(self._buf):
                self._fill()
                continue
            got = self._buf[i : i + start + count - self.rank]
            parts.append(got)
            self.rank += len(got)
        rel = parts[0] if len(parts) == 1 else np.concatenate(parts or [self._buf[:0]])
        return rel, self.sizes[start : self.rank]

    def end(self) -> int:
        """Position after the last cluster."""
        while self._at + len(self._buf) < len(self.sizes):
            self._fill()
        return self._end


class Descriptors:
    """L2 entries of the data clusters, handed out in rank order (as the L2 tables need them)."""

    def __init__(self, sizes: np.ndarray, cs: int, base: int, cluster_bits: int):
        self.packer = Packer(sizes, cs)
        self.base = np.uint64(base)
        self.x = np.uint64(L.compressed_fields(cluster_bits)[0])

    def __call__(self, rank: int, count: int) -> np.ndarray:
        assert rank == self.packer.rank, "descriptors must be taken in order"
        rel, sz = self.packer.take(count)
        off = rel + self.base
        sz64 = sz.astype(np.uint64)
        sect = ((off + sz64 - np.uint64(1)) >> np.uint64(9)) - (off >> np.uint64(9))
        return np.where(
            sz == 0,
            off | np.uint64(L.OFLAG_COPIED),
            np.uint64(L.OFLAG_COMPRESSED) | (sect << self.x) | off,
        ).astype(np.uint64)
