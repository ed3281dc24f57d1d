"""VHDX log replay, read-only (MS-VHDX 2.3): find the active log sequence and present the file
as it would be after replay, without writing to it.

Why read-only: exports read images they must not modify (a snapshot, a read-only share). The
replayed sectors are kept in memory (at most the log's size, which is checked against the file
size) and laid over reads of the file.

Why linear: the log is hostile input as much as any header. Every 4 KiB sector may claim to
start an entry as long as the whole log, and every entry may claim a successor. So an entry may
not contain another entry's header (a sector starting with "loge"; data sectors start with
"data", descriptor sectors with "desc"/"zero"), which makes the stretches of log that candidate
entries cover disjoint: checking them all reads the log about once. Chains are followed once
per entry (each entry has at most one successor), descriptors are checked with numpy and
decoded only for the sequence replayed (at most MAX_WRITES of them), and the replayed writes are
flattened once into disjoint ranges that a read finds by bisection.
"""

from __future__ import annotations

import bisect
import heapq
import struct

import numpy as np

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.formats import _vhdx_layout as L

SECTOR = 4096
ENTRY = struct.Struct("<4sIIIQII16sQQ")  # 64-byte log entry header
# 32-byte descriptors ("zero": leading holds ZeroLength) and 4 KiB data sectors
DESC = np.dtype(
    [("sig", "S4"), ("trailing", "<u4"), ("leading", "<u8"), ("offset", "<u8"), ("seq", "<u8")]
)
DATA = np.dtype([("sig", "S4"), ("high", "<u4"), ("body", "V4084"), ("low", "<u4")])
MAX_WRITES = 1 << 18  # replayed writes held in memory (a 1 MiB log holds at most 32,256)


class _Entry:
    __slots__ = ("offset", "length", "tail", "seq", "flushed", "last", "count", "data_at")

    def __init__(self, offset, length, tail, seq, flushed, last, count, data_at):
        self.offset, self.length, self.tail, self.seq = offset, length, tail, seq
        self.flushed, self.last = flushed, last
        self.count = count  # descriptors
        self.data_at = data_at  # where the data sectors start, from the entry's start


def _span(log: bytes, at: int, length: int) -> bytes:
    """``length`` bytes of the circular log from ``at``."""
    end = at + length
    if end <= len(log):
        return log[at:end]
    return log[at:] + log[: end - len(log)]


def _headers_inside(heads: np.ndarray, first: int, count: int) -> bool:
    """Whether any of the ``count`` sectors after sector ``first`` (circularly) starts an
    entry header."""
    n = len(heads)
    lo, hi = first + 1, first + count
    if hi <= n:
        return bool(heads[lo:hi].any())
    return bool(heads[lo:].any() or heads[: hi - n].any())


def _valid_body(raw: bytes, seq: int, count: int, data_at: int) -> bool:
    """Descriptors and data sectors of an entry check out (numpy: an entry may hold a hundred
    thousand descriptors)."""
    desc = np.frombuffer(raw, DESC, count, 64)
    zero = desc["sig"] == b"zero"
    data = desc["sig"] == b"desc"
    if not (zero | data).all() or (desc["seq"] != seq).any() or (desc["offset"] % SECTOR).any():
        return False
    if (desc["leading"][zero] % SECTOR).any():
        return False
    n = int(data.sum())
    if data_at + n * SECTOR > len(raw):
        return False
    sectors = np.frombuffer(raw, DATA, n, data_at)
    stamps = sectors["high"].astype(np.uint64) << np.uint64(32) | sectors["low"]
    return bool((sectors["sig"] == b"data").all() and (stamps == seq).all())


def _parse_entry(log: bytes, at: int, guid: bytes, heads: np.ndarray) -> _Entry | None:
    """The valid entry starting at ``at`` in the circular log, or None."""
    size = len(log)
    head = log[at : at + 64]
    if head[:4] != L.LOG_ENTRY_SIG:
        return None
    _, crc, length, tail, seq, count, _, entry_guid, flushed, last = ENTRY.unpack(head)
    if entry_guid != guid or length < SECTOR or length % SECTOR or length > size:
        return None
    if tail % SECTOR or tail >= size or seq == 0:
        return None
    desc_sectors = -(-(64 + 32 * count) // SECTOR)
    if desc_sectors > length // SECTOR:
        return None
    if _headers_inside(heads, at // SECTOR, length // SECTOR):
        return None  # another entry starts inside this one: not a whole entry
    raw = _span(log, at, length)
    if not _valid_body(raw, seq, count, desc_sectors * SECTOR):
        return None
    if L.crc32c(raw[:4] + bytes(4) + raw[8:]) != crc:
        return None
    return _Entry(at, length, tail, seq, flushed, last, count, desc_sectors * SECTOR)


def _writes(log: bytes, entry: _Entry) -> list[tuple[int, bytes | int]]:
    """An entry's writes in descriptor order: (file offset, 4 KiB of data | a length to zero).
    A data sector carries 4084 bytes; its first 8 and last 4 are in the descriptor."""
    raw = _span(log, entry.offset, entry.length)
    out: list[tuple[int, bytes | int]] = []
    at = entry.data_at
    for sig, trailing, leading, offset, _ in np.frombuffer(raw, DESC, entry.count, 64).tolist():
        if sig == b"zero":
            out.append((offset, leading))
        else:
            body = struct.pack("<Q", leading) + raw[at + 8 : at + 4092]
            out.append((offset, body + struct.pack("<I", trailing)))
            at += SECTOR
    return out


def active_sequence(log: bytes, guid: bytes) -> list[_Entry]:
    """Entries to replay, oldest first; empty when the log holds no valid sequence."""
    size = len(log) - len(log) % SECTOR
    log = log[:size]
    if not size:
        return []
    sigs = np.frombuffer(log, dtype="S4", count=size // SECTOR * (SECTOR // 4))
    heads = sigs[:: SECTOR // 4] == L.LOG_ENTRY_SIG
    valid: dict[int, _Entry] = {}
    for sector in np.flatnonzero(heads).tolist():
        entry = _parse_entry(log, sector * SECTOR, guid, heads)
        if entry is not None:
            valid[entry.offset] = entry
    # each entry has at most one successor (the entry right after it, one sequence number
    # on), and sequence numbers only grow, so successors form chains: find each entry's last
    following: dict[int, int] = {}
    for at, e in valid.items():
        nxt = valid.get((at + e.length) % size)
        if nxt is not None and nxt.seq == e.seq + 1:
            following[at] = nxt.offset
    last_of: dict[int, int] = {}
    for at in valid:
        path = []
        while at not in last_of and at in following:
            path.append(at)
            at = following[at]
        end = last_of.get(at, at)
        for p in path:
            last_of[p] = end
        last_of[at] = end
    # a sequence ends at a chain's last entry and starts at the tail that entry names, which
    # must lie on the same chain; the highest sequence number wins
    best: list[_Entry] = []
    for at, e in valid.items():
        if at in following:
            continue
        start = valid.get(e.tail)
        if start is None or last_of[start.offset] != at:
            continue
        if not best or e.seq > best[-1].seq:
            chain = [start]
            while chain[-1].offset != at:
                chain.append(valid[following[chain[-1].offset]])
            best = chain
    return best


def _flatten(ops: list[tuple[int, bytes | int]]) -> list[tuple[int, int, int, bytes | None]]:
    """Writes applied in order, as disjoint (start, end, write start, data or None for zeros)
    ranges in file order: a sweep over the write boundaries keeps the latest write covering
    each stretch."""
    spans = []
    for order, (off, patch) in enumerate(ops):
        n = patch if isinstance(patch, int) else len(patch)
        if n > 0:
            spans.append((off, off + n, order, None if isinstance(patch, int) else patch))
    spans.sort(key=lambda s: s[0])
    points = sorted({p for s in spans for p in s[:2]})
    live: list[tuple[int, int, int, bytes | None]] = []  # (-order, end, start, data)
    out: list[tuple[int, int, int, bytes | None]] = []
    j = 0
    for lo, hi in zip(points, points[1:], strict=False):
        while j < len(spans) and spans[j][0] <= lo:
            start, end, order, data = spans[j]
            heapq.heappush(live, (-order, end, start, data))
            j += 1
        while live and live[0][1] <= lo:
            heapq.heappop(live)
        if not live:
            continue
        _, _, start, data = live[0]
        if out and out[-1][1] == lo and out[-1][2] == start and out[-1][3] is data:
            out[-1] = (out[-1][0], hi, start, data)
        else:
            out.append((lo, hi, start, data))
    return out


class ReplayedReader:
    """A RangeReader showing the file after the writes of ``entries`` (from ``log``), without
    modifying it."""

    def __init__(self, reader, log: bytes, entries: list[_Entry]):
        self._reader = reader
        self.name = reader.name
        head = entries[-1]
        if reader.size < head.flushed:
            raise FormatError(
                self.name,
                f"VHDX log says the file held {head.flushed} bytes but it has {reader.size}: "
                "the image is truncated",
            )
        count = sum(e.count for e in entries)
        if count > MAX_WRITES:
            raise UnsupportedFormatError(
                self.name, f"VHDX log replays {count} writes, more than the {MAX_WRITES} read here"
            )
        self._segments = _flatten([w for e in entries for w in _writes(log, e)])  # in order
        self._ends = [s[1] for s in self._segments]
        written = max((s[1] for s in self._segments if s[3] is not None), default=0)
        if written > reader.size + len(log):
            raise FormatError(
                self.name,
                f"VHDX log writes up to offset {written}, far past the end of the file "
                f"({reader.size} bytes): the log is corrupt",
            )
        # the file as replay leaves it: grown only as far as the logged data reaches (a larger
        # LastFileOffset alone would let the tables point at bytes the file never had)
        self.size = max(reader.size, written)

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        inside = max(0, min(end, self._reader.size) - offset)
        buf = bytearray(self._reader.read(offset, inside) if inside else b"")
        buf += bytes(length - len(buf))
        i = bisect.bisect_right(self._ends, offset)
        while i < len(self._segments) and self._segments[i][0] < end:
            lo, hi, start, data = self._segments[i]
            lo, hi = max(lo, offset), min(hi, end)
            if data is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = data[lo - start : hi - start]
            i += 1
        return bytes(buf)

    def close(self) -> None:
        self._reader.close()
