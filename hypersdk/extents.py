"""Extents and extent maps: the common currency between sources, block maps and format writers.

An ExtentMap lists the byte ranges an export defines. Outside them, a full export reads as zeros
and a delta reads from its base. An extent flagged ``zero`` is defined as zeros (a delta uses it to
zero a range that held data in the base).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


# The most extents a map holds. Past it, the smallest gaps are bridged (see ExtentCollector): a
# fragmented multi-TiB disk costs a little extra I/O instead of unbounded memory. At ~120 bytes an
# extent, plus what a format plans from each, this keeps planning well under 100 MiB.
MAX_EXTENTS = 1 << 18


class ExtentCollector:
    """Builds an ExtentMap from extents given in ascending order, holding at most ``limit``.

    Adjacent extents of the same kind merge. When the count reaches ``limit``, the smallest half
    of the gaps between extents are bridged: the two neighbours and the gap become one data
    extent. That is always correct, because a writer reads data extents from the source: a gap
    of a full export reads as the zeros it holds, a gap of a delta as the unchanged bytes the
    base also has. Only the output grows a little (zeros or unchanged bytes stored as data),
    and only for disks fragmented past ``limit`` runs.
    """

    __slots__ = ("size", "limit", "bridged", "_out")

    def __init__(self, size: int, limit: int | None = None):
        self.size = size
        self.limit = max(2, limit or MAX_EXTENTS)
        self.bridged = 0  # gap bytes turned into data so far
        self._out: list[Extent] = []

    def add(self, offset: int, length: int, zero: bool = False) -> None:
        if length <= 0:
            return
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"extent {offset}+{length} outside disk of {self.size} bytes")
        out = self._out
        if out:
            last = out[-1]
            if offset < last.end:
                raise ValueError(f"overlapping or unordered extents at {offset}")
            if offset == last.end and zero == last.zero:
                out[-1] = Extent(last.offset, last.length + length, zero)
                return
        out.append(Extent(offset, length, zero))
        if len(out) >= self.limit:
            self._coarsen()

    def extend(self, extents: Iterable[Extent]) -> None:
        for e in extents:
            self.add(e.offset, e.length, e.zero)

    def _coarsen(self) -> None:
        out = self._out
        gaps = sorted(b.offset - a.end for a, b in zip(out, out[1:], strict=False))
        budget = len(out) // 2  # gaps to bridge: at most this many, the smallest first
        threshold = gaps[budget - 1]
        below = sum(1 for g in gaps[:budget] if g < threshold)
        ties = budget - below  # how many gaps equal to the threshold may still go
        merged = [out[0]]
        for e in out[1:]:
            last = merged[-1]
            gap = e.offset - last.end
            if gap < threshold or (gap == threshold and ties > 0):
                if gap == threshold:
                    ties -= 1
                self.bridged += gap
                merged[-1] = Extent(last.offset, e.end - last.offset)  # data: read from source
            else:
                merged.append(e)
        self._out = merged

    def build(self) -> ExtentMap:
        m = ExtentMap.__new__(ExtentMap)
        m.size = self.size
        m._extents = self._out
        self._out = []
        return m


class ExtentMap:
    """Sorted, non-overlapping, merged extents over a disk of ``size`` bytes (at most
    MAX_EXTENTS of them: a more fragmented input is bridged, see ExtentCollector)."""

    __slots__ = ("size", "_extents")

    def __init__(self, size: int, extents: Iterable[Extent] = ()):
        self.size = size
        collector = ExtentCollector(size)
        collector.extend(sorted(extents, key=lambda x: x.offset))
        self._extents = collector.build()._extents

    @classmethod
    def full(cls, size: int) -> ExtentMap:
        return cls(size, [Extent(0, size)] if size else [])

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._extents)

    def __len__(self) -> int:
        return len(self._extents)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExtentMap)
            and self.size == other.size
            and self._extents == other._extents
        )

    def __repr__(self) -> str:
        return f"ExtentMap(size={self.size}, extents={self._extents[:8]}{'...' if len(self) > 8 else ''})"

    @property
    def data_bytes(self) -> int:
        """Bytes carried as data (not flagged zero)."""
        return sum(e.length for e in self._extents if not e.zero)

    @property
    def defined_bytes(self) -> int:
        return sum(e.length for e in self._extents)

    @property
    def has_zero_extents(self) -> bool:
        return any(e.zero for e in self._extents)

    def data(self) -> Iterator[Extent]:
        return (e for e in self._extents if not e.zero)

    def split(self, chunk: int) -> Iterator[Extent]:
        """Yield the extents cut at every multiple of ``chunk`` (aligned pieces for hashing/IO)."""
        for e in self._extents:
            pos = e.offset
            while pos < e.end:
                stop = min(e.end, (pos // chunk + 1) * chunk)
                yield Extent(pos, stop - pos, e.zero)
                pos = stop

    def aligned(self, block: int) -> ExtentMap:
        """Widen every extent to ``block`` boundaries (clipped to the disk size).

        Where a widened data extent meets a zero extent the data wins: the writer reads those
        bytes from the source, which is always correct.
        """
        out: list[Extent] = []
        for e in self._extents:
            start = e.offset // block * block
            end = min(self.size, -(-e.end // block) * block)
            out.append(Extent(start, end - start, e.zero))
        return ExtentMap(self.size, _resolve_overlaps(out))


def _resolve_overlaps(extents: list[Extent]) -> list[Extent]:
    """Merge overlapping extents; data beats zero where they overlap."""
    points: list[Extent] = []
    for e in sorted(extents, key=lambda x: (x.offset, x.zero)):
        if points and e.offset < points[-1].end:
            last = points[-1]
            if last.zero == e.zero:
                points[-1] = Extent(last.offset, max(last.end, e.end) - last.offset, last.zero)
            elif not last.zero:  # data then zero: zero keeps only what sticks out
                if e.end > last.end:
                    points.append(Extent(last.end, e.end - last.end, True))
            else:  # zero then data: trim the zero, data takes over
                trimmed = e.offset - last.offset
                tail_end = last.end
                points[-1] = Extent(last.offset, trimmed, True)
                if trimmed == 0:
                    points.pop()
                points.append(e)
                if tail_end > e.end:
                    points.append(Extent(e.end, tail_end - e.end, True))
        else:
            points.append(e)
    return [p for p in points if p.length > 0]
