"""HSDELTA reader: one layer of a backup chain, as a DiskImage.

A layer answers the guest ranges its index covers (data from its data area, zeros for zero
entries) and the ranges past its parent's virtual size (zeros: the disk grew). Everything else
belongs to the parent: ``parent_read(offset, length)`` (set by the chain reader) answers it, and
without one such a read is an error, never zeros. ``extents()`` likewise refuses to describe a
lone layer whose parent shows through, so ``hyperctl convert`` of a delta alone fails instead of
writing a disk with holes where the parent's bytes belong.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

import blake3
import numpy as np

from hypersdk.errors import FormatError, HyperSDKError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats import _hsdelta_layout as L
from hypersdk.formats.base import DiskImage
from hypersdk.io import IO_CHUNK, RangeReader

ParentRead = Callable[[int, int], bytes]
_INDEX_CHUNK = L.ENTRY_SIZE * (1 << 16)  # index bytes read (and hashed) at a time: 1.5 MiB


class DeltaLayer(DiskImage):
    """One HSDELTA object, opened and validated (header, index) against its real size.

    ``parent_read``: reads the parent point's guest bytes (offsets below the parent's virtual
    size only); ``parent_extents``: the parent's ``extents()``, so this layer's ``extents()``
    can say where data shows through. Both may be set after opening (the chain reader does)."""

    format = "hsdelta"

    def __init__(
        self,
        reader: RangeReader,
        parent_read: ParentRead | None = None,
        parent_extents: Callable[[], ExtentMap] | None = None,
    ):
        name = reader.name
        size = reader.size
        head = reader.read(0, min(size, L.HEADER_SIZE))
        self.header = h = L.parse_header(name, head, size)
        super().__init__(reader, h.virtual_size)
        self.parent_read = parent_read
        self.parent_extents = parent_extents
        table = _load_index(reader, h)
        problem = L.index_problem(table, h.virtual_size, h.data_size)
        if problem:
            raise FormatError(name, f"HSDELTA {problem}")
        pad = reader.read(
            L.INDEX_OFFSET + h.index_size, h.data_offset - L.INDEX_OFFSET - h.index_size
        )
        if any(pad):
            raise FormatError(name, "HSDELTA padding between index and data is not zero")
        self._starts = table["offset"].astype(np.int64)
        self._ends = self._starts + table["length"].astype(np.int64)
        self._zero = table["kind"] == L.ZERO
        lengths = np.where(self._zero, 0, self._ends - self._starts)
        # where each entry's bytes start in the object (zero entries: where the next would)
        self._data_at = h.data_offset + np.cumsum(lengths) - lengths

    # ------------------------------------------------------------------------------ describe
    def covered(self, offset: int, length: int) -> list[Extent]:
        """This layer's own entries within ``offset``..``offset+length``, clipped, in order
        (``zero`` set for zero entries); the gaps between them are the parent's (or zeros past
        the parent's virtual size)."""
        return [Extent(a, b - a, z) for a, b, z, _ in self._segments(offset, offset + length)]

    def own_extents(self) -> ExtentMap:
        """Every entry of the index: data extents and zero extents (which hide the parent)."""
        out = ExtentCollector(self.virtual_size, limit=len(self._starts) + 2)
        for a, b, z in zip(
            self._starts.tolist(), self._ends.tolist(), self._zero.tolist(), strict=True
        ):
            out.add(a, b - a, z)
        return out.build()

    def extents(self) -> ExtentMap:
        """Where the point's guest data may be: this layer's data entries, and the gaps below
        the parent's virtual size where the parent shows through (its own ``extents()`` when
        known, all of the gap otherwise). A lone layer with such gaps cannot say: error."""
        gaps = self._parent_gaps()
        if gaps and self.parent_read is None:
            raise self._needs_chain(gaps[0][0], gaps[0][1] - gaps[0][0])
        if gaps and self.parent_extents is not None:
            gaps = _intersect(gaps, [(e.offset, e.end) for e in self.parent_extents().data()])
        data = zip(
            self._starts[~self._zero].tolist(), self._ends[~self._zero].tolist(), strict=True
        )
        out = ExtentCollector(self.virtual_size)
        for a, b in heapq.merge(data, gaps):  # disjoint: entries and the gaps between them
            out.add(a, b - a)
        return out.build()

    def info(self) -> dict:
        h = self.header
        data = int(np.count_nonzero(~self._zero))
        zero_bytes = int((self._ends - self._starts)[self._zero].sum())
        return {
            "delta": (
                f"a backup delta of export {h.parent_export_id}, disk {h.parent_disk}: "
                "bytes it does not hold are its parent's, read it through its backup chain"
            ),
            "parent_export_id": h.parent_export_id,
            "parent_disk": h.parent_disk,
            "parent_object_blake3": h.parent_object_blake3.hex(),
            "parent_virtual_size": h.parent_virtual_size,
            "extent_count": h.extent_count,
            "data_extents": data,
            "zero_extents": h.extent_count - data,
            "data_bytes": h.data_size,
            "zero_bytes": zero_bytes,
            "data_offset": h.data_offset,
            "index_blake3": h.index_blake3.hex(),
        }

    def check(self) -> list[str]:
        """The index once more, and every byte of the data area read (a ranged read that fails
        or comes back short is a problem)."""
        h = self.header
        problems = []
        table = np.zeros(len(self._starts), dtype=L.INDEX_DTYPE)
        table["offset"], table["length"] = self._starts, self._ends - self._starts
        table["kind"] = np.where(self._zero, L.ZERO, L.DATA)
        problem = L.index_problem(table, h.virtual_size, h.data_size)
        if problem:
            problems.append(problem)
        if self.reader.size != h.object_size:
            problems.append(f"object is {self.reader.size} bytes, the header says {h.object_size}")
        for at in range(h.data_offset, h.object_size, IO_CHUNK):
            n = min(IO_CHUNK, h.object_size - at)
            try:
                got = len(self.reader.read(at, n))
            except HyperSDKError as exc:
                problems.append(f"data area unreadable at {at}: {exc}")
                break
            if got != n:
                problems.append(f"data area read at {at} gave {got} of {n} bytes")
                break
        return problems

    # --------------------------------------------------------------------------------- read
    def read(self, offset: int, length: int) -> bytes:
        end = self._check_range(offset, length)
        parts = []
        pos = offset
        for a, b, zero, at in self._segments(offset, end):
            if a > pos:
                parts.append(self._gap(pos, a))
            parts.append(bytes(b - a) if zero else self._data(at, b - a))
            pos = b
        if pos < end:
            parts.append(self._gap(pos, end))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, offset: int, view: memoryview) -> None:
        """``read`` into a caller's buffer (``hypersdk.io.read_pieces``' fast path)."""
        end = self._check_range(offset, len(view))
        view[:] = self.read(offset, end - offset)

    def _check_range(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        return offset + length

    def _segments(self, start: int, end: int) -> Iterator[tuple[int, int, bool, int]]:
        """(from, to, zero, object offset of ``from``) of each entry meeting start..end, clipped."""
        if end <= start:
            return
        i = int(np.searchsorted(self._ends, start, side="right"))
        j = int(np.searchsorted(self._starts, end, side="left"))
        for k in range(i, j):
            s, e = int(self._starts[k]), int(self._ends[k])
            a, b = max(s, start), min(e, end)
            yield a, b, bool(self._zero[k]), int(self._data_at[k]) + a - s

    def _all_pieces(self) -> Iterator[tuple[int, int, bool | None]]:
        """The whole disk in order: entries (zero flag) and the gaps between them (None),
        leaving out what lies past the parent's virtual size (zeros)."""
        pos = 0
        for a, b, z in zip(
            self._starts.tolist(), self._ends.tolist(), self._zero.tolist(), strict=True
        ):
            if a > pos:
                yield from self._gap_pieces(pos, a)
            yield a, b, z
            pos = b
        yield from self._gap_pieces(pos, self.virtual_size)

    def _gap_pieces(self, a: int, b: int) -> Iterator[tuple[int, int, None]]:
        b = min(b, self.header.parent_virtual_size)
        if a < b:
            yield a, b, None

    def _parent_gaps(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b, z in self._all_pieces() if z is None]

    def _data(self, at: int, n: int) -> bytes:
        data = self.reader.read(at, n)
        if len(data) != n:
            raise FormatError(self.name, f"HSDELTA data read at {at} gave {len(data)} of {n} bytes")
        return data

    def _gap(self, a: int, b: int) -> bytes:
        """Bytes a..b that no entry covers: the parent's below its virtual size, zeros past it."""
        mid = max(a, min(b, self.header.parent_virtual_size))
        head = b""
        if a < mid:
            if self.parent_read is None:
                raise self._needs_chain(a, mid - a)
            head = self.parent_read(a, mid - a)
            if len(head) != mid - a:
                raise FormatError(self.name, f"parent gave {len(head)} bytes for {a}+{mid - a}")
        return head + bytes(b - mid) if b > mid else head

    def _needs_chain(self, offset: int, length: int) -> FormatError:
        h = self.header
        return FormatError(
            self.name,
            f"guest bytes {offset}+{length} are not in this delta: they are its parent's "
            f"(export {h.parent_export_id}, disk {h.parent_disk}); read the delta through its "
            "backup chain",
        )


def _intersect(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The overlap of two sorted lists of disjoint ranges."""
    out = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] <= ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _load_index(reader: RangeReader, h: L.DeltaHeader) -> np.ndarray:
    """The index, read a chunk at a time into one array (its size is bounded by the object's,
    checked in the header), hashed as it comes."""
    table = np.empty(h.extent_count, dtype=L.INDEX_DTYPE)
    raw = table.view(np.uint8)
    hasher = blake3.blake3()
    for at in range(0, h.index_size, _INDEX_CHUNK):
        n = min(_INDEX_CHUNK, h.index_size - at)
        chunk = reader.read(L.INDEX_OFFSET + at, n)
        if len(chunk) != n:
            raise FormatError(reader.name, f"HSDELTA index read at {at} gave {len(chunk)} bytes")
        hasher.update(chunk)
        raw[at : at + n] = np.frombuffer(chunk, dtype=np.uint8)
    if hasher.digest() != h.index_blake3:
        raise FormatError(reader.name, "HSDELTA index hash mismatch: the index is corrupt")
    return table
