"""QCOW2 on-disk structures (qemu docs/interop/qcow2.txt), apart from the logic that walks them.

All numbers are big-endian. The header is 72 bytes in version 2 and ``header_length`` bytes
(104, or 112 with the compression type field) in version 3, followed by header extensions
(type, length, data padded to 8 bytes) up to an end marker, then the backing file name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length
V3_HEADER_LENGTH = 112  # with compression_type (1 byte) and 7 bytes padding
EXTENSION = struct.Struct(">II")

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# L1 / L2 / refcount table entries
OFLAG_COPIED = 1 << 63  # refcount is exactly 1 (standard clusters and L2 tables)
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # v3 only: the cluster reads as zeros
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: host offset of an L2 table / standard cluster
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00

# what an L2 entry makes of its guest cluster (qemu's QCow2ClusterType)
ZERO, UNALLOC, STD, COMP = 2, 3, 4, 5

# internal snapshot table entry: l1_table_offset, l1_size, id_str_size, name_size, date_sec,
# date_nsec, vm_clock_nsec, vm_state_size, extra_data_size; then extra data, id, name, padded to 8
SNAPSHOT = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOT_EXTRA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA

# deflate's best ratio is about 1032:1, so a compressed cluster takes at least cs/1032 bytes of
# the file: more compressed clusters than that cannot all be distinct (they alias one blob)
MAX_DEFLATE_RATIO = 1032

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
SECTOR = 512

# raw deflate with a 4 KiB window, as qemu writes it; inflate accepts any smaller window
DEFLATE_WBITS = -12
INFLATE_WBITS = -15


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def compressed_fields(cluster_bits: int) -> tuple[int, int]:
    """(offset bits x, sector-count mask) of a compressed cluster descriptor."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << (cluster_bits - 8)) - 1


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER.size
    compression_type: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse; the caller checked ``len(data) >= 104`` for v3 and the magic."""
        f = V2_HEADER.unpack_from(data)
        h = cls(*f[1:])
        if h.version >= 3:
            (
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features,
                h.refcount_order,
                h.header_length,
            ) = V3_EXTRA.unpack_from(data, V2_HEADER.size)
            if h.header_length > 104 and len(data) > 104:
                h.compression_type = data[104]
        return h

    def pack(self) -> bytes:
        out = V2_HEADER.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            out += V3_EXTRA.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            out += bytes([self.compression_type]) + bytes(self.header_length - 105)
        return out


def pack_extension(kind: int, data: bytes) -> bytes:
    pad = -len(data) % 8
    return EXTENSION.pack(kind, len(data)) + data + bytes(pad)
