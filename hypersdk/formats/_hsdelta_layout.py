"""HSDELTA v1 on-disk structures: the 4096-byte header and the 24-byte index entries
(docs/repository.md, section "HSDELTA v1", is the specification; this module is its code).

Everything a reader trusts is checked here against the object's real size before anything is
allocated: an index of N entries needs 24 N bytes of object, the data area's size is stated in
the header and must end exactly at the object's end, and both the header and the index carry
their own BLAKE3, so a flipped bit is caught at open without hashing the whole object.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import numpy as np

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.names import is_export_id

MAGIC = b"HSDELTA1"
VERSION = 1
HEADER_SIZE = 4096
INDEX_OFFSET = HEADER_SIZE
ENTRY_SIZE = 24
DATA, ZERO = 1, 2
KIND_NAMES = {DATA: "data", ZERO: "zero"}
MAX_EXPORT_ID = 128  # bytes of UTF-8
MAX_DISK = 255  # bytes of UTF-8
MAX_SIZE = (1 << 63) - 1  # virtual sizes: every offset fits a signed 64-bit integer
# The most index entries a v1 object may hold (24 MiB of index): four times what the writer can
# emit (an ExtentMap holds fewer than 2**18 extents), so readers stay bounded whatever the
# header claims.
MAX_ENTRIES = 1 << 20

# magic, version, flags, virtual_size, parent_virtual_size, extent_count, index_offset,
# data_offset, data_size, parent_object_blake3, index_blake3, header_blake3
_FIXED = struct.Struct("<8sIIQQQQQQ32s32s32s")
HEADER_HASH_AT = 128  # offset of header_blake3
STRINGS_AT = _FIXED.size  # 160: parent_export_id, then parent_disk (u16 length + UTF-8 each)
assert STRINGS_AT == HEADER_HASH_AT + 32

INDEX_DTYPE = np.dtype(
    [("offset", "<u8"), ("length", "<u8"), ("kind", "u1"), ("reserved", "u1", (7,))]
)
assert INDEX_DTYPE.itemsize == ENTRY_SIZE


def data_offset_for(count: int) -> int:
    """Where the data area starts: the end of an index of ``count`` entries, rounded up to 4096."""
    end = INDEX_OFFSET + count * ENTRY_SIZE
    return -(-end // HEADER_SIZE) * HEADER_SIZE


@dataclass(frozen=True)
class DeltaHeader:
    virtual_size: int
    parent_virtual_size: int
    extent_count: int
    data_offset: int
    data_size: int
    parent_export_id: str
    parent_disk: str
    parent_object_blake3: bytes
    index_blake3: bytes

    @property
    def index_size(self) -> int:
        return self.extent_count * ENTRY_SIZE

    @property
    def object_size(self) -> int:
        return self.data_offset + self.data_size

    def pack(self) -> bytes:
        """The 4096 header bytes, header_blake3 filled in."""
        buf = bytearray(HEADER_SIZE)
        _FIXED.pack_into(
            buf, 0, MAGIC, VERSION, 0, self.virtual_size, self.parent_virtual_size,
            self.extent_count, INDEX_OFFSET, self.data_offset, self.data_size,
            self.parent_object_blake3, self.index_blake3, bytes(32),
        )  # fmt: skip
        at = STRINGS_AT
        for text in (self.parent_export_id, self.parent_disk):
            raw = text.encode("utf-8")
            struct.pack_into("<H", buf, at, len(raw))
            buf[at + 2 : at + 2 + len(raw)] = raw
            at += 2 + len(raw)
        buf[HEADER_HASH_AT : HEADER_HASH_AT + 32] = blake3.blake3(bytes(buf)).digest()
        return bytes(buf)


def parse_header(name: str, raw: bytes, object_size: int) -> DeltaHeader:
    """The validated header of an object of ``object_size`` bytes whose first bytes are ``raw``.

    Checked in this order, so each problem gets its own message: size, magic, version, the
    header hash, flags, strings and padding, then every size against the object's real size."""
    if object_size < HEADER_SIZE or len(raw) < HEADER_SIZE:
        raise FormatError(
            name,
            f"truncated HSDELTA object: {object_size} bytes, shorter than its "
            f"{HEADER_SIZE}-byte header",
        )
    raw = bytes(raw[:HEADER_SIZE])
    (
        magic, version, flags, vsize, parent_vsize, count, index_offset, data_offset, data_size,
        parent_hash, index_hash, header_hash,
    ) = _FIXED.unpack_from(raw)  # fmt: skip
    if magic != MAGIC:
        raise FormatError(name, "not an HSDELTA object (magic 'HSDELTA1' missing)")
    if version != VERSION:
        raise UnsupportedFormatError(name, f"HSDELTA version {version} is not supported (only 1)")
    zeroed = raw[:HEADER_HASH_AT] + bytes(32) + raw[HEADER_HASH_AT + 32 :]
    if blake3.blake3(zeroed).digest() != header_hash:
        raise FormatError(name, "HSDELTA header hash mismatch: the header is corrupt")
    if flags != 0:
        raise UnsupportedFormatError(name, f"HSDELTA flags {flags:#x} are not supported (only 0)")
    export_id, at = _string(name, raw, STRINGS_AT, MAX_EXPORT_ID, "parent export id")
    disk, at = _string(name, raw, at, MAX_DISK, "parent disk name")
    if not is_export_id(export_id):
        raise FormatError(name, f"HSDELTA parent export id {export_id!r} is malformed")
    if any(raw[at:]):
        raise FormatError(name, f"HSDELTA header padding at {at}..{HEADER_SIZE} is not zero")
    if vsize > MAX_SIZE or parent_vsize > MAX_SIZE:
        raise FormatError(name, f"HSDELTA virtual sizes {vsize}/{parent_vsize} exceed 2**63-1")
    if index_offset != INDEX_OFFSET:
        raise FormatError(name, f"HSDELTA index offset {index_offset} is not {INDEX_OFFSET}")
    room = (object_size - INDEX_OFFSET) // ENTRY_SIZE
    if count > room:
        raise FormatError(
            name,
            f"HSDELTA index of {count} entries needs {count * ENTRY_SIZE} bytes, the object "
            f"has {object_size - INDEX_OFFSET} after its header: truncated or corrupt",
        )
    if count > MAX_ENTRIES:
        raise FormatError(name, f"HSDELTA index of {count} entries exceeds {MAX_ENTRIES}")
    if data_offset != data_offset_for(count):
        raise FormatError(
            name,
            f"HSDELTA data offset {data_offset} is not {data_offset_for(count)} (the end of "
            f"an index of {count} entries, rounded up to 4096)",
        )
    if data_size > vsize:
        raise FormatError(
            name, f"HSDELTA data area of {data_size} bytes exceeds the disk's {vsize}"
        )
    if data_offset + data_size != object_size:
        short = data_offset + data_size > object_size
        raise FormatError(
            name,
            f"HSDELTA data area {'short' if short else 'followed by extra bytes'}: the header "
            f"says the object ends at {data_offset + data_size}, it has {object_size} bytes",
        )
    return DeltaHeader(
        virtual_size=vsize,
        parent_virtual_size=parent_vsize,
        extent_count=count,
        data_offset=data_offset,
        data_size=data_size,
        parent_export_id=export_id,
        parent_disk=disk,
        parent_object_blake3=parent_hash,
        index_blake3=index_hash,
    )


def _string(name: str, raw: bytes, at: int, limit: int, what: str) -> tuple[str, int]:
    (length,) = struct.unpack_from("<H", raw, at)
    if not 0 < length <= limit:
        raise FormatError(name, f"HSDELTA {what} length {length} is not 1..{limit}")
    try:
        return raw[at + 2 : at + 2 + length].decode("utf-8"), at + 2 + length
    except UnicodeDecodeError:
        raise FormatError(name, f"HSDELTA {what} is not UTF-8") from None


# ------------------------------------------------------------------------------------ index
def pack_index(offsets: np.ndarray, lengths: np.ndarray, kinds: np.ndarray) -> bytes:
    table = np.zeros(len(offsets), dtype=INDEX_DTYPE)
    table["offset"], table["length"], table["kind"] = offsets, lengths, kinds
    return table.tobytes()


def index_problem(table: np.ndarray, virtual_size: int, data_size: int) -> str | None:
    """The first thing wrong with a loaded index (None: sound): kinds, reserved bytes, empty
    entries, entries past the disk, order and overlap, and the data bytes it accounts for."""
    if not len(table):
        return None if data_size == 0 else f"empty index but a data area of {data_size} bytes"
    offsets, lengths, kinds = table["offset"], table["length"], table["kind"]
    checks = (
        ((kinds != DATA) & (kinds != ZERO), "has kind {kind} (1 = data, 2 = zero)"),
        (table["reserved"].any(axis=1), "has non-zero reserved bytes"),
        (lengths == 0, "is empty (length 0)"),
        (
            (lengths > virtual_size) | (offsets > np.uint64(virtual_size) - lengths),
            "({offset}+{length}) ends past the disk's {virtual_size} bytes",
        ),
    )
    for bad, text in checks:
        hit = np.flatnonzero(bad)
        if hit.size:
            i = int(hit[0])
            return f"index entry {i} " + text.format(
                kind=int(kinds[i]),
                offset=int(offsets[i]),
                length=int(lengths[i]),
                virtual_size=virtual_size,
            )
    ends = offsets + lengths  # no overflow: every end is at most virtual_size now
    unsorted = np.flatnonzero(offsets[1:] < offsets[:-1])
    if unsorted.size:
        i = int(unsorted[0]) + 1
        return (
            f"index entry {i} at {int(offsets[i])} comes after entry {i - 1} at "
            f"{int(offsets[i - 1])}: entries must be sorted by guest offset"
        )
    overlap = np.flatnonzero(offsets[1:] < ends[:-1])
    if overlap.size:
        i = int(overlap[0]) + 1
        return (
            f"index entry {i} at {int(offsets[i])} overlaps entry {i - 1} "
            f"({int(offsets[i - 1])}+{int(lengths[i - 1])})"
        )
    counted = int(lengths[kinds == DATA].sum(dtype=np.uint64))  # at most virtual_size: disjoint
    if counted != data_size:
        return f"index holds {counted} data bytes, the header's data area {data_size}"
    return None
