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


class ExtentMap:
    """Sorted, non-overlapping, merged extents over a disk of ``size`` bytes."""

    __slots__ = ("size", "_extents")

    def __init__(self, size: int, extents: Iterable[Extent] = ()):
        self.size = size
        self._extents = self._normalise(size, extents)

    @staticmethod
    def _normalise(size: int, extents: Iterable[Extent]) -> list[Extent]:
        merged: list[Extent] = []
        for e in sorted(extents, key=lambda x: x.offset):
            if e.length <= 0:
                continue
            if e.offset < 0 or e.end > size:
                raise ValueError(f"extent {e.offset}+{e.length} outside disk of {size} bytes")
            if merged:
                last = merged[-1]
                if e.offset < last.end:
                    raise ValueError(f"overlapping extents at {e.offset}")
                if e.offset == last.end and e.zero == last.zero:
                    merged[-1] = Extent(last.offset, last.length + e.length, last.zero)
                    continue
            merged.append(e)
        return merged

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
