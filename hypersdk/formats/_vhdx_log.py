"""VHDX log replay, read-only (MS-VHDX 2.3): find the active log sequence and present the file
as it would be after replay, without writing to it.

Why read-only: exports read images they must not modify (a snapshot, a read-only share). The
replayed sectors are kept in memory (at most the log's size, which is checked against the file
size) and laid over reads of the file.
"""

from __future__ import annotations

import struct

from hypersdk.errors import FormatError
from hypersdk.formats import _vhdx_layout as L

SECTOR = 4096
ENTRY = struct.Struct("<4sIIIQII16sQQ")  # 64-byte log entry header
DESC = struct.Struct("<4sIQQQ")  # 32-byte descriptor (data: trailing, leading; zero: -, length)
DATA_HDR = struct.Struct("<4sI")  # "data", sequence high; then 4084 bytes; sequence low at 4092


class _Entry:
    __slots__ = ("offset", "length", "tail", "seq", "flushed", "last", "ops")

    def __init__(self, offset, length, tail, seq, flushed, last, ops):
        self.offset, self.length, self.tail, self.seq = offset, length, tail, seq
        self.flushed, self.last = flushed, last
        # (file offset, 4 KiB of data | a length to zero), in descriptor order
        self.ops: list[tuple[int, bytes | int]] = ops


def _parse_entry(log: bytes, at: int, guid: bytes) -> _Entry | None:
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
    raw = (log + log)[at : at + length] if at + length > size else log[at : at + length]
    if L.crc32c(raw[:4] + bytes(4) + raw[8:]) != crc:
        return None
    ops: list[tuple[int, bytes | int]] = []
    data_at = desc_sectors * SECTOR
    for i in range(count):
        kind, trailing, leading, file_off, dseq = DESC.unpack_from(raw, 64 + 32 * i)
        if dseq != seq:
            return None
        if kind == b"zero":
            if file_off % SECTOR or leading % SECTOR:  # leading holds ZeroLength here
                return None
            ops.append((file_off, leading))
        elif kind == b"desc":
            if file_off % SECTOR or data_at + SECTOR > length:
                return None
            sector = raw[data_at : data_at + SECTOR]
            sig, high = DATA_HDR.unpack_from(sector)
            low = struct.unpack_from("<I", sector, 4092)[0]
            if sig != b"data" or (high << 32 | low) != seq:
                return None
            body = struct.pack("<Q", leading) + sector[8:4092] + struct.pack("<I", trailing)
            ops.append((file_off, body))
            data_at += SECTOR
        else:
            return None
    return _Entry(at, length, tail, seq, flushed, last, ops)


def active_sequence(log: bytes, guid: bytes) -> list[_Entry]:
    """Entries to replay, oldest first; empty when the log holds no valid sequence."""
    size = len(log)
    valid = {}
    for at in range(0, size, SECTOR):
        if log[at : at + 4] == L.LOG_ENTRY_SIG:
            entry = _parse_entry(log, at, guid)
            if entry is not None:
                valid[at] = entry
    best: list[_Entry] = []
    for start in valid.values():
        chain = [start]
        while True:
            nxt = valid.get((chain[-1].offset + chain[-1].length) % size)
            if nxt is None or nxt.seq != chain[-1].seq + 1 or len(chain) > len(valid):
                break
            chain.append(nxt)
        head = chain[-1]
        offsets = [e.offset for e in chain]
        if head.tail not in offsets:
            continue
        chain = chain[offsets.index(head.tail) :]
        if not best or head.seq > best[-1].seq:
            best = chain
    return best


class ReplayedReader:
    """A RangeReader showing the file after the log's writes, without modifying it."""

    def __init__(self, reader, entries: list[_Entry]):
        self._reader = reader
        self.name = reader.name
        head = entries[-1]
        if reader.size < head.flushed:
            raise FormatError(
                self.name,
                f"VHDX log says the file held {head.flushed} bytes but it has {reader.size}: "
                "the image is truncated",
            )
        self.size = max(reader.size, head.last)
        self._patches = [op for e in entries for op in e.ops]  # in replay order

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(self._reader.read(offset, length))
        end = offset + length
        for off, patch in self._patches:
            n = patch if isinstance(patch, int) else len(patch)
            lo, hi = max(off, offset), min(off + n, end)
            if lo >= hi:
                continue
            if isinstance(patch, int):
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = patch[lo - off : hi - off]
        return bytes(buf)

    def close(self) -> None:
        self._reader.close()
