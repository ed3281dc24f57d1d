"""VHD (Microsoft Virtual Hard Disk, qemu's "vpc"): fixed and dynamic images.

Fixed: the guest bytes, then a 512-byte footer. Dynamic: a footer copy, the dynamic header, the
Block Allocation Table, then 2 MiB blocks each preceded by its sector bitmap, then the footer.
All fields are big-endian; footer and dynamic header carry a one's-complement byte-sum checksum.

Virtual size: writers put the exact size in ``current_size`` and mark the creator as "qem2", which
qemu (and Hyper-V/Azure, which always use current_size) read as authoritative; the CHS geometry
is filled per the spec but, as it rounds down, is never the size. Readers follow qemu: CHS for
creators known to mean it (Virtual PC, old qemu), current_size otherwise.
"""

from __future__ import annotations

import struct
import time
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
    parse_size,
    read_mapped,
    refuse_delta,
    table_chunks,
    used_blocks,
)
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import RangeReader, Sink

SECTOR = 512
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
BLOCK = 2 * 1024 * 1024
MAX_SIZE = 2040 * 1024**3  # qemu's and Azure's limit (VHD_MAX_SECTORS)
MAX_GEOMETRY = 65535 * 16 * 255
UNUSED = 0xFFFFFFFF
EPOCH = 946684800  # 2000-01-01T00:00:00Z: VHD timestamps count from here
# creator apps whose images qemu sizes by current_size rather than CHS geometry
_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")  # first 85 bytes of the footer
_DYN = struct.Struct(">8sQQIIII16sI")  # first 60 bytes of the dynamic header


def checksum(buf: bytes, at: int) -> int:
    """One's complement of the byte sum, the checksum field (4 bytes at ``at``) counted as 0."""
    total = sum(buf) - sum(buf[at : at + 4])
    return ~total & 0xFFFFFFFF


def geometry(size: int) -> tuple[int, int, int]:
    """CHS per the VHD spec (appendix "CHS calculation"); rounds down, capped at ~127 GiB x 16."""
    total = min(size // SECTOR, MAX_GEOMETRY)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def make_footer(size: int, disk_type: int, data_offset: int, uid: bytes, stamp: int) -> bytes:
    cyl, heads, spt = geometry(size)
    buf = bytearray(512)
    _FOOTER.pack_into(
        buf, 0, COOKIE, 2, 0x00010000, data_offset, stamp, b"qem2", 0x00050003, b"Wi2k",
        size, size, cyl, heads, spt, disk_type, 0, uid, 0,
    )  # fmt: skip
    struct.pack_into(">I", buf, 64, checksum(buf, 64))
    return bytes(buf)


def make_dyn_header(table_offset: int, entries: int) -> bytes:
    buf = bytearray(1024)
    _DYN.pack_into(
        buf, 0, DYN_COOKIE, 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, entries, BLOCK, 0,
        bytes(16), 0,
    )  # fmt: skip
    struct.pack_into(">I", buf, 36, checksum(buf, 36))
    return bytes(buf)


# ------------------------------------------------------------------------------------ reader
class VhdImage(DiskImage):
    format = "vhd"

    def __init__(self, reader: RangeReader):
        self.reader = reader
        self.name = reader.name
        fsize = reader.size
        if fsize < SECTOR:
            raise FormatError(self.name, f"file of {fsize} bytes is too small for a VHD footer")
        footer = reader.read(fsize - SECTOR, SECTOR)
        if footer[:8] != COOKIE:
            head = reader.read(0, SECTOR)  # a truncated dynamic VHD still has its footer copy
            if head[:8] != COOKIE:
                raise FormatError(self.name, "no VHD footer (cookie 'conectix' missing)")
            raise FormatError(
                self.name, "VHD footer missing at the end of the file: the image is truncated"
            )
        (
            _, _, version, data_offset, stamp, creator, _, _, _, current, cyl, heads, spt,
            disk_type, stored, uid, _,
        ) = _FOOTER.unpack_from(footer)  # fmt: skip
        if stored != checksum(footer, 64):
            raise FormatError(self.name, "VHD footer checksum mismatch: the footer is corrupt")
        if version >> 16 != 1:
            raise UnsupportedFormatError(self.name, f"VHD version {version:#x} is not supported")
        self.disk_type = disk_type
        self.creator = creator.decode("latin-1")
        self.uid = uuid.UUID(bytes=uid)
        self.current_size = current
        chs = cyl * heads * spt
        self.uses_chs = creator not in _CURRENT_SIZE_CREATORS and chs != MAX_GEOMETRY
        size = chs * SECTOR if self.uses_chs else current
        if size > MAX_SIZE:
            raise FormatError(self.name, f"VHD virtual size {size} exceeds the 2040 GiB limit")
        self.virtual_size = size
        self.alloc: Allocation | None = None  # None: a fixed image
        self.block = BLOCK
        if disk_type == DIFFERENCING:
            raise UnsupportedFormatError(
                self.name,
                "differencing VHD (a child of a parent image) is not supported; merge it "
                "first, e.g. qemu-img convert -O vpc child.vhd merged.vhd",
            )
        if disk_type == FIXED:
            check_range(self.name, "fixed VHD data", 0, size, fsize - SECTOR)
        elif disk_type == DYNAMIC:
            self._open_dynamic(data_offset, fsize)
        else:
            raise FormatError(self.name, f"unknown VHD disk type {disk_type}")

    def _open_dynamic(self, data_offset: int, fsize: int) -> None:
        check_range(self.name, "VHD dynamic header", data_offset, 1024, fsize)
        hdr = self.reader.read(data_offset, 1024)
        cookie, _, table, _, entries, block, stored, _, _ = _DYN.unpack_from(hdr)
        if cookie != DYN_COOKIE:
            raise FormatError(self.name, "VHD dynamic header cookie 'cxsparse' missing")
        if stored != checksum(hdr, 36):
            raise FormatError(self.name, "VHD dynamic header checksum mismatch: it is corrupt")
        if block < SECTOR or block & (block - 1) or block > 256 * 1024 * 1024:
            raise FormatError(self.name, f"VHD block size {block} is invalid")
        if entries * block < self.virtual_size:
            raise FormatError(
                self.name, f"VHD BAT of {entries} entries does not cover the virtual size"
            )
        check_range(self.name, "VHD block allocation table", table, entries * 4, fsize)
        self.block = block
        self.bitmap = -(-(block // SECTOR) // 8 // SECTOR) * SECTOR
        self.table_offset = table
        # entries past the virtual size are never read; the rest a chunk at a time, keeping
        # only the allocated ones (bounded by the file: blocks may not overlap)
        used = -(-self.virtual_size // block)
        self.alloc = Allocation.collect(
            self.name,
            "VHD BAT",
            self._allocated(table, used),
            block=block,
            span=self.bitmap + block,
            file_size=fsize,
            reserved=[
                (0, SECTOR, "footer copy"),
                (data_offset, data_offset + 1024, "dynamic header"),
                (table, table + entries * 4, "block allocation table"),
                (fsize - SECTOR, fsize, "footer"),
            ],
            shift=self.bitmap,
        )

    def _allocated(self, table: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first, chunk in table_chunks(self.reader, table, count, ">u4"):
            (hits,) = np.nonzero(chunk != UNUSED)
            yield hits + first, chunk[hits].astype(np.int64) * SECTOR

    def read(self, offset: int, length: int) -> bytes:
        check_read(self.name, offset, length, self.virtual_size)
        if self.alloc is None:
            return self.reader.read(offset, length)
        return read_mapped(self.reader, offset, length, self.block, self.alloc.locate)

    def extents(self) -> ExtentMap:
        if self.alloc is None:
            return ExtentMap.full(self.virtual_size)
        return self.alloc.extents(self.virtual_size)

    def info(self) -> dict:
        out = {
            "subformat": "fixed" if self.alloc is None else "dynamic",
            "creator_app": self.creator,
            "current_size": self.current_size,
            "size_from_chs": self.uses_chs,
            "unique_id": str(self.uid),
        }
        if self.alloc is not None:
            out |= {"block_size": self.block, "allocated_blocks": len(self.alloc)}
        return out

    def check(self) -> list[str]:
        """Blocks past the file end or over the headers, BAT or each other are refused when
        the image is opened; nothing else can be wrong with the structures we read."""
        return []


# ------------------------------------------------------------------------------------ writer
class VhdLayout(Layout):
    subformat: str = "dynamic"
    blocks: list[int]
    bat_offset: int = 1536
    data_offset: int = 0


class VhdDriver(FormatDriver):
    name = "vhd"
    aliases = ("vpc",)  # qemu-img's name
    extensions = (".vhd", ".vpc")
    option_names = ("subformat", "azure", "align")

    def probe(self, head: bytes, size: int) -> bool:
        # a dynamic VHD starts with its footer copy; a fixed one only ends with it (probe_tail)
        return head[:8] == COOKIE

    def probe_tail(self, tail: bytes, size: int) -> bool:
        """A fixed VHD: the footer cookie in the last sector, with a valid footer checksum."""
        return tail[:8] == COOKIE and struct.unpack_from(">I", tail, 64)[0] == checksum(tail, 64)

    def open(self, reader: RangeReader) -> DiskImage:
        return VhdImage(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        opts = self.check_options(options)
        refuse_delta("VHD", extents, size)
        azure = parse_bool("azure", opts.get("azure", "off"))
        sub = choice(opts, "subformat", ("dynamic", "fixed"), "fixed" if azure else "dynamic")
        if azure and sub != "fixed":
            raise InvalidParameterError("azure=on needs subformat=fixed (Azure takes fixed VHDs)")
        align = parse_size("align", opts["align"]) if "align" in opts else SECTOR
        if azure:
            align = max(align, 1024 * 1024)
        if align % SECTOR:
            raise InvalidParameterError(f"option align={align} must be a multiple of 512")
        vsize = -(-size // align) * align
        if vsize > MAX_SIZE:
            raise InvalidParameterError(
                f"disk of {size} bytes exceeds the VHD limit of 2040 GiB; use vhdx or qcow2"
            )
        layout = VhdLayout(
            virtual_size=vsize,
            extents=extents,
            total_size=0,
            options={"subformat": sub, "azure": "on" if azure else "off", "align": str(align)},
        )
        layout.subformat = sub
        if sub == "fixed":
            layout.blocks = []
            layout.total_size = vsize + SECTOR
            return layout
        entries = -(-vsize // BLOCK)
        bat_end = 1536 + -(-entries * 4 // SECTOR) * SECTOR
        # pad so every block's data (after its 512-byte bitmap) starts 4 KiB aligned
        layout.data_offset = -(-(bat_end + SECTOR) // 4096) * 4096 - SECTOR
        layout.blocks = used_blocks(extents, BLOCK)
        layout.total_size = layout.data_offset + len(layout.blocks) * (SECTOR + BLOCK) + SECTOR
        return layout

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        assert isinstance(layout, VhdLayout)
        uid = uuid.uuid4().bytes
        stamp = max(0, int(time.time()) - EPOCH) & 0xFFFFFFFF
        size = layout.virtual_size
        if layout.subformat == "fixed":
            emit_flat(source, layout.extents, out, size, progress)
            out.write(make_footer(size, FIXED, 0xFFFFFFFFFFFFFFFF, uid, stamp))
            return
        footer = make_footer(size, DYNAMIC, SECTOR, uid, stamp)
        entries = -(-size // BLOCK)
        out.write(footer)
        out.write(make_dyn_header(layout.bat_offset, entries))
        bat = np.full(-(-entries * 4 // SECTOR) * SECTOR // 4, UNUSED, dtype=">u4")
        sector = layout.data_offset // SECTOR
        per_block = (SECTOR + BLOCK) // SECTOR
        bat[layout.blocks] = sector + per_block * np.arange(len(layout.blocks), dtype=np.int64)
        out.write(bat.tobytes())
        out.write_zeros(layout.data_offset - layout.bat_offset - bat.nbytes)
        bitmap = b"\xff" * SECTOR
        emit_blocks(source, layout.extents, BLOCK, out, progress, lambda _i: out.write(bitmap))
        out.write(footer)


DRIVER = VhdDriver()
