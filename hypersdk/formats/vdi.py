"""VDI (VirtualBox Disk Image, header version 1.1): dynamic and static images.

A 512-byte little-endian header, the block map (one u32 per 1 MiB guest block: the block's index
in the data area, 0xFFFFFFFF unallocated, 0xFFFFFFFE discarded = zeros), then the data area.
Static images hold every block, in guest order; dynamic ones only the blocks that hold data.
The data area starts 1 MiB aligned, as VirtualBox lays it out (the gap is a hole).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Mapping

import numpy as np

from hypersdk.errors import FormatError, InvalidParameterError, UnsupportedFormatError
from hypersdk.extents import ExtentMap
from hypersdk.formats._blockfmt import (
    Allocation,
    check_range,
    check_read,
    choice,
    emit_blocks,
    emit_flat,
    parse_bool,
    read_mapped,
    refuse_delta,
    table_chunks,
    used_blocks,
)
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import RangeReader, Sink

SECTOR = 512
BLOCK = 1024 * 1024
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
HEADER_SIZE = 0x180  # bytes after the version field that the 1.1 header uses
DYNAMIC, STATIC = 1, 2
UNALLOCATED, DISCARDED = 0xFFFFFFFF, 0xFFFFFFFE
MAX_BLOCKS = 0x3FFFFFFF  # qemu's VDI_BLOCKS_IN_IMAGE_MAX (UINT32_MAX / 4)
TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
_HDR = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")  # 0x1c8 bytes


def _data_offset(blocks: int) -> int:
    return -(-(SECTOR + blocks * 4) // BLOCK) * BLOCK


def make_header(size: int, image_type: int, blocks: int, allocated: int) -> bytes:
    buf = bytearray(512)
    _HDR.pack_into(
        buf, 0, TEXT, SIGNATURE, VERSION_1_1, HEADER_SIZE, image_type, 0, b"", SECTOR,
        _data_offset(blocks), 0, 0, 0, SECTOR, 0, size, BLOCK, 0, blocks, allocated,
        uuid.uuid4().bytes_le, uuid.uuid4().bytes_le, bytes(16), bytes(16),
    )  # fmt: skip
    return bytes(buf)


# ------------------------------------------------------------------------------------ reader
class VdiImage(DiskImage):
    format = "vdi"

    def __init__(self, reader: RangeReader):
        name = reader.name
        fsize = reader.size
        if fsize < SECTOR:
            raise FormatError(name, f"file of {fsize} bytes is too small for a VDI header")
        (
            _, sig, version, _, itype, _, _, bmap_off, data_off, _, _, _, sector, _, disk_size,
            block, extra, blocks, allocated, uid, _, link, parent,
        ) = _HDR.unpack_from(reader.read(0, SECTOR))  # fmt: skip
        if sig != SIGNATURE:
            raise FormatError(name, "not a VDI image (signature 0xbeda107f missing)")
        if version != VERSION_1_1:
            raise UnsupportedFormatError(name, f"VDI version {version:#x} is not supported")
        if link != bytes(16) or parent != bytes(16) or itype not in (DYNAMIC, STATIC):
            raise UnsupportedFormatError(
                name,
                f"VDI image type {itype} (differencing/undo) is not supported; merge it in "
                "VirtualBox first (VBoxManage clonemedium)",
            )
        if sector != SECTOR or block != BLOCK or extra != 0:
            raise UnsupportedFormatError(
                name, f"VDI with sector size {sector}, block size {block}+{extra} not supported"
            )
        if bmap_off % SECTOR or data_off % SECTOR:
            raise FormatError(name, "VDI block map or data offset is not sector aligned")
        if blocks > MAX_BLOCKS or allocated > blocks:
            raise FormatError(name, f"VDI block counts {blocks}/{allocated} are invalid")
        size = -(-disk_size // SECTOR) * SECTOR
        if size > blocks * BLOCK:
            raise FormatError(name, f"VDI disk size {disk_size} exceeds its {blocks} blocks")
        check_range(name, "VDI block map", bmap_off, blocks * 4, fsize)
        super().__init__(reader, size)
        self.data_off = data_off
        # only the entries that cover the disk, a chunk at a time, keeping the stored ones:
        # data blocks may not overlap, so the file bounds how many there are
        self.alloc = Allocation.collect(
            name,
            "VDI block map",
            self._stored(bmap_off, -(-size // BLOCK), blocks),
            block=BLOCK,
            span=BLOCK,
            file_size=fsize,
            reserved=[(0, SECTOR, "header"), (bmap_off, bmap_off + blocks * 4, "block map")],
        )
        self.image_type = itype
        self.allocated = allocated
        self.uid = uuid.UUID(bytes_le=uid)

    def _stored(
        self, bmap_off: int, count: int, blocks: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first, chunk in table_chunks(self.reader, bmap_off, count, "<u4"):
            (hits,) = np.nonzero(chunk < DISCARDED)
            stored = chunk[hits].astype(np.int64)
            if stored.size and int(stored.max()) >= blocks:
                raise FormatError(
                    self.name, f"VDI block map entry {int(stored.max())} is out of range"
                )
            yield hits + first, self.data_off + stored * BLOCK

    def read(self, offset: int, length: int) -> bytes:
        check_read(self.name, offset, length, self.virtual_size)
        return read_mapped(self.reader, offset, length, BLOCK, self.alloc.locate)

    def extents(self) -> ExtentMap:
        return self.alloc.extents(self.virtual_size)

    def info(self) -> dict:
        return {
            "subformat": "static" if self.image_type == STATIC else "dynamic",
            "block_size": BLOCK,
            "allocated_blocks": len(self.alloc),
            "uuid": str(self.uid),
        }

    def check(self) -> list[str]:
        """Shared or out-of-file data blocks are refused at open; what is left to find is a
        header whose allocated-block count disagrees with the map."""
        mapped = len(self.alloc)
        if mapped > self.allocated:
            return [f"{mapped} blocks mapped but the header counts {self.allocated} allocated"]
        return []


# ------------------------------------------------------------------------------------ writer
class VdiLayout(Layout):
    static: bool = False
    blocks: range | list[int]


class VdiDriver(FormatDriver):
    name = "vdi"
    extensions = (".vdi",)
    option_names = ("subformat", "static")

    def probe(self, head: bytes, size: int) -> bool:
        return len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == SIGNATURE

    def open(self, reader: RangeReader) -> DiskImage:
        return VdiImage(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        opts = self.check_options(options)
        refuse_delta("VDI", extents, size)
        sub = choice(opts, "subformat", ("dynamic", "static"), "dynamic")
        if "static" in opts:  # qemu-img's spelling: static=on
            sub = "static" if parse_bool("static", opts["static"]) else "dynamic"
        vsize = -(-size // SECTOR) * SECTOR
        count = -(-vsize // BLOCK)
        if count > MAX_BLOCKS:
            raise InvalidParameterError(f"disk of {size} bytes is too large for VDI")
        layout = VdiLayout(virtual_size=vsize, extents=extents, total_size=0,
                           options={"subformat": sub})  # fmt: skip
        layout.static = sub == "static"
        layout.blocks = range(count) if layout.static else used_blocks(extents, BLOCK)
        layout.total_size = _data_offset(count) + len(layout.blocks) * BLOCK
        return layout

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        assert isinstance(layout, VdiLayout)
        count = -(-layout.virtual_size // BLOCK)
        itype = STATIC if layout.static else DYNAMIC
        out.write(make_header(layout.virtual_size, itype, count, len(layout.blocks)))
        used = None if layout.static else np.asarray(layout.blocks, dtype=np.int64)
        for start in range(0, count, 1 << 20):  # bounded memory for huge disks
            stop = min(count, start + (1 << 20))
            if used is None:
                chunk = np.arange(start, stop, dtype="<u4")
            else:
                chunk = np.full(stop - start, UNALLOCATED, dtype="<u4")
                lo, hi = np.searchsorted(used, [start, stop])
                chunk[used[lo:hi] - start] = np.arange(lo, hi)
            out.write(chunk.tobytes())
        out.write_zeros(_data_offset(count) - SECTOR - count * 4)
        if layout.static:
            emit_flat(source, layout.extents, out, count * BLOCK, progress)
        else:
            emit_blocks(source, layout.extents, BLOCK, out, progress)


DRIVER = VdiDriver()
