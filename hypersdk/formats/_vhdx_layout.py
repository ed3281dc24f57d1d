"""VHDX on-disk structures (MS-VHDX): GUIDs, CRC-32C, headers, region and metadata tables.

Kept apart from the driver so the reader and writer share one definition of every byte.
All integers little-endian; GUIDs in Microsoft's mixed-endian layout (uuid.bytes_le).
"""

from __future__ import annotations

import struct
import uuid

KiB, MiB = 1024, 1024 * 1024
FILE_SIG = b"vhdxfile"
HEADER_SIG = b"head"
REGION_SIG = b"regi"
METADATA_SIG = b"metadata"
LOG_ENTRY_SIG = b"loge"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MAX_SIZE = 64 * 1024**4  # 64 TiB, the spec's limit

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_ITEMS = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR, PHYSICAL_SECTOR}

# BAT entry states (low 3 bits); the file offset in MiB sits in bits 20..63
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
ZERO_STATES = (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED)
OFFSET_MASK = ~((1 << 20) - 1) & 0xFFFFFFFFFFFFFFFF

# item flags in the metadata table
IS_VIRTUAL_DISK, IS_REQUIRED = 2, 4

HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")  # first 80 bytes of a header
REGION_HDR = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
META_HDR = struct.Struct("<8sHH20x")
META_ENTRY = struct.Struct("<16sIII4x")

try:  # the C implementation ships with google-cloud-storage; a table is the fallback
    from google_crc32c import value as _crc32c_c
except ImportError:  # pragma: no cover - depends on installed packages
    _crc32c_c = None


def _table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_TABLE = _table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as VHDX headers and region tables use."""
    if _crc32c_c is not None:
        return _crc32c_c(bytes(data))
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc_ok(buf: bytes) -> bool:
    """The CRC-32C at bytes 4..8, computed with that field zeroed, matches."""
    stored = struct.unpack_from("<I", buf, 4)[0]
    return crc32c(buf[:4] + bytes(4) + buf[8:]) == stored


def seal(buf: bytearray) -> bytes:
    struct.pack_into("<I", buf, 4, 0)
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    return (1 << 23) * logical_sector // block_size


def bat_entries(data_blocks: int, ratio: int) -> int:
    """Entries of a non-differencing BAT: payload entries with a sector-bitmap entry after
    every ``ratio`` of them."""
    return data_blocks + max(0, data_blocks - 1) // ratio


def file_identifier(creator: str) -> bytes:
    buf = bytearray(64 * KiB)
    buf[:8] = FILE_SIG
    name = creator.encode("utf-16-le")[:510]
    buf[8 : 8 + len(name)] = name
    return bytes(buf)


def make_header(seq: int, log_offset: int, log_length: int) -> bytes:
    buf = bytearray(HEADER_SIZE)
    HEADER.pack_into(
        buf, 0, HEADER_SIG, 0, seq, uuid.uuid4().bytes_le, uuid.uuid4().bytes_le, bytes(16),
        0, 1, log_length, log_offset,
    )  # fmt: skip
    return seal(buf)


def make_region_table(regions: list[tuple[uuid.UUID, int, int]]) -> bytes:
    buf = bytearray(REGION_SIZE)
    REGION_HDR.pack_into(buf, 0, REGION_SIG, 0, len(regions), 0)
    for i, (guid, offset, length) in enumerate(regions):
        REGION_ENTRY.pack_into(buf, 16 + i * 32, guid.bytes_le, offset, length, 1)
    return seal(buf)


def make_metadata(block_size: int, size: int, disk_id: uuid.UUID, physical: int) -> bytes:
    """The metadata table and its items, packed after the 64 KiB table."""
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 0), IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), IS_VIRTUAL_DISK | IS_REQUIRED),
        (PAGE83_DATA, disk_id.bytes_le, IS_VIRTUAL_DISK | IS_REQUIRED),
        (LOGICAL_SECTOR, struct.pack("<I", 512), IS_VIRTUAL_DISK | IS_REQUIRED),
        (PHYSICAL_SECTOR, struct.pack("<I", physical), IS_VIRTUAL_DISK | IS_REQUIRED),
    ]
    table = bytearray(METADATA_TABLE_SIZE)
    META_HDR.pack_into(table, 0, METADATA_SIG, 0, len(items))
    data = bytearray()
    for i, (guid, value, flags) in enumerate(items):
        META_ENTRY.pack_into(
            table, 32 + i * 32, guid.bytes_le, METADATA_TABLE_SIZE + len(data), len(value), flags
        )
        data += value
    return bytes(table) + bytes(data)
