"""Parallels expandable images (qemu's "parallels": the .hds files inside a Parallels Desktop or
Virtuozzo .hdd directory), read-only.

A 64-byte little-endian header, the BAT (one u32 per cluster) right after it at offset 64, then
the data area of whole clusters. A BAT entry of 0 is an unallocated cluster (zeros); otherwise
it is the cluster's file offset, in sectors for "WithoutFreeSpace" images and in clusters for
"WithouFreSpacExt" ones (qemu writes the latter). The cluster size is ``tracks`` sectors (qemu:
1 MiB by default). Layout as in qemu's docs/interop/parallels.rst; the format extension
(dirty bitmaps) does not change what the disk holds and is not read, only kept clear of data.

Like qemu, an image not closed cleanly (``in_use``) is still read (``check`` reports it), and
the "empty image" flag is ignored. Whatever the header says, only the BAT entries that cover the
disk are read, a chunk at a time, and clusters may not overlap the header, the BAT or each
other (the spec requires unique offsets), so memory and time follow the real file size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from hypersdk.errors import FormatError
from hypersdk.extents import ExtentMap
from hypersdk.formats._blockfmt import (
    Allocation,
    check_range,
    check_read,
    read_mapped,
    table_chunks,
)
from hypersdk.formats.base import DiskImage, FormatDriver
from hypersdk.io import RangeReader

SECTOR = 512
MAGIC_SECTORS = b"WithoutFreeSpace"  # BAT entries count sectors
MAGIC_CLUSTERS = b"WithouFreSpacExt"  # BAT entries count clusters
VERSION = 2
IN_USE = 0x746F6E59  # opened read-write and not closed since
HEADER = struct.Struct("<16sIIIIIQIIIQ")  # 64 bytes
BAT_OFFSET = HEADER.size
MAX_TRACKS = 0x7FFFFFFF // 513  # qemu's bound on the cluster size, in sectors (~2 GiB)


class ParallelsImage(DiskImage):
    format = "parallels"

    def __init__(self, reader: RangeReader):
        name = reader.name
        fsize = reader.size
        if fsize < HEADER.size:
            raise FormatError(name, f"file of {fsize} bytes is too small for a Parallels header")
        (magic, version, _heads, _cyl, tracks, entries, sectors, in_use, data_off, flags,
         ext_off) = HEADER.unpack(reader.read(0, HEADER.size))  # fmt: skip
        if magic not in (MAGIC_SECTORS, MAGIC_CLUSTERS) or version != VERSION:
            raise FormatError(name, "not a Parallels image (magic or version 2 missing)")
        if not 0 < tracks <= MAX_TRACKS:
            raise FormatError(name, f"Parallels cluster size of {tracks} sectors is invalid")
        if magic == MAGIC_SECTORS:
            sectors &= 0xFFFFFFFF  # only the low half counts in the old format
        cluster = tracks * SECTOR
        size = sectors * SECTOR
        if size > entries * cluster:
            raise FormatError(
                name,
                f"Parallels disk of {size} bytes exceeds its BAT of {entries} clusters of "
                f"{cluster} bytes",
            )
        bat_end = BAT_OFFSET + entries * 4
        check_range(name, "Parallels BAT", BAT_OFFSET, entries * 4, fsize)
        data_start = data_off * SECTOR if data_off else -(-bat_end // SECTOR) * SECTOR
        super().__init__(reader, size)
        self.cluster = cluster
        self.unit = SECTOR if magic == MAGIC_SECTORS else cluster  # what a BAT entry counts
        self.magic = magic.decode()
        self.in_use = in_use == IN_USE
        self.flags = flags
        self.data_start = data_start
        reserved = [(0, max(bat_end, data_start), "header and BAT")]
        if ext_off:
            reserved.append((ext_off * SECTOR, ext_off * SECTOR + cluster, "format extension"))
        self.alloc = Allocation.collect(
            name,
            "Parallels BAT",
            self._allocated(-(-size // cluster)),
            block=cluster,
            span=cluster,
            file_size=fsize,
            reserved=reserved,
        )

    def _allocated(self, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first, chunk in table_chunks(self.reader, BAT_OFFSET, count, "<u4"):
            (hits,) = np.nonzero(chunk)
            yield hits + first, chunk[hits].astype(np.int64) * self.unit

    def read(self, offset: int, length: int) -> bytes:
        check_read(self.name, offset, length, self.virtual_size)
        return read_mapped(self.reader, offset, length, self.cluster, self.alloc.locate)

    def extents(self) -> ExtentMap:
        return self.alloc.extents(self.virtual_size)

    def info(self) -> dict:
        return {
            "subformat": self.magic,
            "cluster_size": self.cluster,
            "allocated_clusters": len(self.alloc),
            "data_offset": self.data_start,
            "closed_cleanly": not self.in_use,
        }

    def check(self) -> list[str]:
        """Out-of-file, overlapping or shared clusters are refused at open; what is left to
        report is what qemu-img check reports as an error: an image left open."""
        if self.in_use:
            return ["the image was not closed cleanly (in_use is set)"]
        return []


class ParallelsDriver(FormatDriver):
    name = "parallels"
    extensions = (".hds",)
    can_write = False

    def probe(self, head: bytes, size: int) -> bool:
        return (
            len(head) >= HEADER.size
            and head[:16] in (MAGIC_SECTORS, MAGIC_CLUSTERS)
            and struct.unpack_from("<I", head, 16)[0] == VERSION
        )

    def open(self, reader: RangeReader) -> DiskImage:
        return ParallelsImage(reader)


DRIVER = ParallelsDriver()
