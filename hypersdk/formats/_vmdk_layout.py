"""VMDK on-disk structures (VMware "Virtual Disk Format 1.1"), apart from the logic that walks them.

All numbers are little-endian; offsets and sizes in the sparse header are in 512-byte sectors.

Hosted sparse extent (monolithicSparse, streamOptimized, each part of twoGbMaxExtentSparse)::

    sector 0        SparseExtentHeader (512 bytes, magic "KDMV")
    descriptor      embedded text descriptor (descriptorOffset, descriptorSize)
    RGD, GTs        redundant grain directory and tables (monolithicSparse only)
    GD, GTs         grain directory: uint32 sector offsets of grain tables (0: none)
                    grain table: numGTEsPerGT uint32 sector offsets of grains (0: unallocated,
                    1: zero grain when the zeroed-grain flag is set)
    grains          grainSize sectors each

streamOptimized puts every grain behind a 12-byte marker (lba uint64, compressed size uint32) and
writes the tables after the grains, each behind a 512-byte metadata marker (numSectors uint64,
size uint32 = 0, type uint32), then a footer (a copy of the header holding the real gdOffset) and
an end-of-stream marker. The header's gdOffset is then GD_AT_END and the footer sits at EOF-1024.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
MAGIC = 0x564D444B  # "KDMV" on disk
MAGIC_BYTES = b"KDMV"
HEADER = struct.Struct("<IIIQQQQIQQQB4sH")  # 79 bytes, padded to 512
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17

COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1

# streamOptimized markers
GRAIN_MARKER = struct.Struct("<QI")  # lba (sectors), size of the compressed data
META_MARKER = struct.Struct("<QII")  # numSectors, size (0), type
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

GTE_ZERO = 1  # grain table entry of a zero grain (zeroed-grain flag)
DEFAULT_GRAIN_SECTORS = 128  # 64 KiB
GTES_PER_GT = 512
MAX_GRAIN_SECTORS = 4096  # 2 MiB: anything larger is treated as corrupt
MAX_GTES_PER_GT = 4096
DESCRIPTOR_SECTORS = 20  # what qemu and VMware reserve for an embedded descriptor
MAX_DESCRIPTOR_BYTES = 1024 * 1024


@dataclass
class SparseHeader:
    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int  # sectors before the first grain
    unclean_shutdown: int = 0
    compress_algorithm: int = COMPRESS_NONE

    @classmethod
    def unpack(cls, data: bytes) -> SparseHeader:
        """Parse the 512-byte header; the caller checked the length and the magic."""
        f = HEADER.unpack_from(data)
        return cls(
            version=f[1],
            flags=f[2],
            capacity=f[3],
            grain_size=f[4],
            descriptor_offset=f[5],
            descriptor_size=f[6],
            num_gtes_per_gt=f[7],
            rgd_offset=f[8],
            gd_offset=f[9],
            overhead=f[10],
            unclean_shutdown=f[11],
            compress_algorithm=f[13],
        )

    def pack(self) -> bytes:
        raw = HEADER.pack(
            MAGIC,
            self.version,
            self.flags,
            self.capacity,
            self.grain_size,
            self.descriptor_offset,
            self.descriptor_size,
            self.num_gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            self.unclean_shutdown,
            b"\n \r\n",  # newline-detection characters
            self.compress_algorithm,
        )
        return raw + bytes(SECTOR - len(raw))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def meta_marker(sectors: int, kind: int) -> bytes:
    """A 512-byte metadata marker announcing ``sectors`` sectors of ``kind``."""
    raw = META_MARKER.pack(sectors, 0, kind)
    return raw + bytes(SECTOR - len(raw))


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors) as VMware and qemu state it: 255/63 for SCSI-sized disks."""
    sectors = size // SECTOR
    heads, spt = 255, 63
    cylinders = max(1, min(sectors // (heads * spt), 65535))
    return cylinders, heads, spt


ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX", "pvscsi", "sata")
SUBFORMATS = ("monolithicSparse", "streamOptimized", "monolithicFlat")
# createType -> the extent kind its extents are (None: not a disk we could read at all). Which
# of them we read is decided by the extent kinds _vmdk_extents reads: one table, not two.
CREATE_TYPES: dict[str, str | None] = {
    "monolithicSparse": "SPARSE",
    "streamOptimized": "SPARSE",
    "twoGbMaxExtentSparse": "SPARSE",
    "monolithicFlat": "FLAT",
    "twoGbMaxExtentFlat": "FLAT",
    "vmfs": "VMFS",
    "vmfsSparse": "VMFSSPARSE",
    "seSparse": "SESPARSE",
    "vmfsRaw": "VMFSRAW",
    "vmfsRawDeviceMap": "VMFSRDM",
    "vmfsPassthroughRawDeviceMap": "VMFSRDM",
    "fullDevice": None,  # extents name host devices
    "partitionedDevice": None,
    "custom": None,
}

COWD_MAGIC = b"COWD"  # a VMFS sparse (vmfsSparse) extent: ESX's redo-log format, not read here
