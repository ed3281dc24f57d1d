"""VHDX (MS-VHDX): dynamic and fixed images, written and read natively.

Written layout (all 1 MiB aligned): file identifier, two headers, two region tables; an empty
1 MiB log at 1 MiB; metadata at 2 MiB; the BAT at 3 MiB (payload entries with a sector-bitmap
entry after every chunk-ratio of them); then the payload blocks in guest order. Fixed images hold
every block; dynamic ones only blocks with data (others NOT_PRESENT, reading as zeros).

Reading picks the valid header with the highest sequence number (CRC-32C checked), replays a
pending log in memory (an image not closed cleanly; the file is never modified) and refuses
differencing images.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Mapping

import numpy as np

from hypersdk.errors import FormatError, InvalidParameterError, UnsupportedFormatError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _vhdx_layout as L
from hypersdk.formats._blockfmt import (
    TABLE_CHUNK,
    Allocation,
    check_range,
    check_read,
    choice,
    emit_blocks,
    emit_flat,
    parse_size,
    read_mapped,
    refuse_delta,
    table_chunks,
    used_blocks,
)
from hypersdk.formats._vhdx_log import ReplayedReader, active_sequence
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import RangeReader, Sink

MiB = L.MiB
LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB
MAX_LOG = 128 * MiB  # a log is held in memory while it is replayed


def default_block_size(size: int) -> int:
    """qemu-img's choice, so our images look like the ones it makes."""
    if size > 32 * 1024**4:
        return 64 * MiB
    if size > 100 * 1024**3:
        return 32 * MiB
    if size > 1024**3:
        return 16 * MiB
    return 8 * MiB


# ------------------------------------------------------------------------------------ reader
class VhdxImage(DiskImage):
    format = "vhdx"

    def __init__(self, reader: RangeReader):
        self.reader = reader
        self.name = reader.name
        self.fsize = reader.size
        if self.fsize < 320 * L.KiB:
            raise FormatError(self.name, f"file of {self.fsize} bytes is too small for VHDX")
        if reader.read(0, 8) != L.FILE_SIG:
            raise FormatError(self.name, "not a VHDX image (signature 'vhdxfile' missing)")
        header = self._current_header()
        self.seq = header[2]
        log_guid, log_length, log_offset = header[5], header[8], header[9]
        if header[7] != 1:
            raise UnsupportedFormatError(self.name, f"VHDX version {header[7]} not supported")
        self.replayed = 0
        if log_guid != bytes(16):
            self._replay_log(log_guid, log_offset, log_length)
        regions = self._regions()
        bat_off, bat_len = regions[L.BAT_GUID]
        meta_off, meta_len = regions[L.METADATA_GUID]
        self._metadata(meta_off, meta_len)
        reserved = [(meta_off, meta_off + meta_len, "metadata region")]
        if log_guid != bytes(16) or log_length:
            reserved.append((log_offset, log_offset + log_length, "log"))
        self._load_bat(bat_off, bat_len, reserved)

    # -- headers and tables
    def _bad(self, problem: str) -> FormatError:
        return FormatError(self.name, problem)

    def _current_header(self) -> tuple:
        best = None
        for off in L.HEADER_OFFSETS:
            buf = self.reader.read(off, L.HEADER_SIZE)
            if buf[:4] == L.HEADER_SIG and L.crc_ok(buf):
                fields = L.HEADER.unpack_from(buf)
                if best is None or fields[2] > best[2]:
                    best = fields
        if best is None:
            raise self._bad("both VHDX headers are damaged (bad signature or CRC-32C)")
        return best

    def _replay_log(self, log_guid: bytes, offset: int, length: int) -> None:
        """A non-zero log GUID may mean writes not yet applied: replay them in memory."""
        if offset % MiB or length % MiB or length == 0:
            raise self._bad("VHDX log offset/length are not 1 MiB multiples")
        if length > MAX_LOG:
            raise UnsupportedFormatError(
                self.name,
                f"VHDX log of {length} bytes is not supported (at most {MAX_LOG}; Hyper-V and "
                "qemu write 1 MiB logs)",
            )
        check_range(self.name, "VHDX log", offset, length, self.fsize)
        log = self.reader.read(offset, length)
        entries = active_sequence(log, log_guid)
        if entries:
            self.reader = ReplayedReader(self.reader, log, entries)
            self.fsize = self.reader.size
            self.replayed = len(entries)

    def _regions(self) -> dict:
        for off in L.REGION_OFFSETS:
            buf = self.reader.read(off, L.REGION_SIZE)
            if buf[:4] == L.REGION_SIG and L.crc_ok(buf):
                break
        else:
            raise self._bad("both VHDX region tables are damaged (bad signature or CRC-32C)")
        count = L.REGION_HDR.unpack_from(buf)[2]
        if count > L.MAX_ENTRIES:
            raise self._bad(f"VHDX region table claims {count} entries")
        found: dict = {}
        for i in range(count):
            guid, offset, length, flags = L.REGION_ENTRY.unpack_from(buf, 16 + i * 32)
            gid = uuid.UUID(bytes_le=guid)
            if gid in (L.BAT_GUID, L.METADATA_GUID):
                if offset % MiB or offset < MiB or length % MiB:
                    raise self._bad(f"VHDX region {gid} at {offset}+{length} is misaligned")
                check_range(self.name, f"VHDX region {gid}", offset, length, self.fsize)
                found[gid] = (offset, length)
            elif flags & 1:
                raise UnsupportedFormatError(self.name, f"VHDX needs unknown region {gid}")
        for need in (L.BAT_GUID, L.METADATA_GUID):
            if need not in found:
                raise self._bad(f"VHDX region table lacks the {need} region")
        return found

    def _metadata(self, offset: int, length: int) -> None:
        if length < L.METADATA_TABLE_SIZE:  # region lengths are MiB multiples: this is 0
            raise self._bad(f"VHDX metadata region of {length} bytes cannot hold its table")
        table = self.reader.read(offset, L.METADATA_TABLE_SIZE)
        sig, _, count = L.META_HDR.unpack_from(table)
        if sig != L.METADATA_SIG:
            raise self._bad("VHDX metadata table signature missing")
        if count > L.MAX_ENTRIES or 32 + count * 32 > len(table):
            raise self._bad(f"VHDX metadata table claims {count} entries")
        items: dict[uuid.UUID, bytes] = {}
        for i in range(count):
            guid, item_off, item_len, flags = L.META_ENTRY.unpack_from(table, 32 + i * 32)
            gid = uuid.UUID(bytes_le=guid)
            if gid == L.PARENT_LOCATOR:
                raise UnsupportedFormatError(
                    self.name, "differencing VHDX (has a parent) is not supported; merge it first"
                )
            if gid not in L.KNOWN_ITEMS:
                if flags & L.IS_REQUIRED:
                    raise UnsupportedFormatError(self.name, f"VHDX needs unknown metadata {gid}")
                continue
            if item_len > 64 or item_off < L.METADATA_TABLE_SIZE or item_off + item_len > length:
                raise self._bad(f"VHDX metadata item {gid} at {item_off}+{item_len} is invalid")
            items[gid] = self.reader.read(offset + item_off, item_len)

        def get(gid: uuid.UUID, fmt: str) -> tuple:
            value = items.get(gid)
            if value is None or len(value) < struct.calcsize(fmt):
                raise self._bad(f"VHDX metadata item {gid} is missing or short")
            return struct.unpack_from(fmt, value)

        block, flags = get(L.FILE_PARAMETERS, "<II")
        if flags & 2:
            raise UnsupportedFormatError(
                self.name, "differencing VHDX (has a parent) is not supported; merge it first"
            )
        if block < MiB or block > 256 * MiB or block & (block - 1):
            raise self._bad(f"VHDX block size {block} is invalid")
        (size,) = get(L.VIRTUAL_DISK_SIZE, "<Q")
        (logical,) = get(L.LOGICAL_SECTOR, "<I")
        (physical,) = get(L.PHYSICAL_SECTOR, "<I")
        if logical not in (512, 4096) or physical not in (512, 4096):
            raise self._bad(f"VHDX sector sizes {logical}/{physical} are invalid")
        if size > L.MAX_SIZE or size % logical:
            raise self._bad(f"VHDX virtual size {size} is invalid")
        self.virtual_size = size
        self.block = block
        self.logical, self.physical = logical, physical
        self.leave_allocated = bool(flags & 1)
        page83 = items.get(L.PAGE83_DATA)
        self.disk_id = uuid.UUID(bytes_le=page83[:16]) if page83 and len(page83) >= 16 else None

    def _load_bat(self, offset: int, length: int, reserved: list[tuple[int, int, str]]) -> None:
        ratio = L.chunk_ratio(self.block, self.logical)
        blocks = -(-self.virtual_size // self.block)
        entries = L.bat_entries(blocks, ratio)
        if entries * 8 > length:
            raise self._bad(f"VHDX BAT region ({length} bytes) is too small for {entries} entries")
        # a chunk of whole chunk-ratio groups at a time, keeping only present blocks: they may
        # not overlap each other or the headers, log, metadata and BAT, so the file bounds them
        self.alloc = Allocation.collect(
            self.name,
            "VHDX BAT",
            self._present(offset, entries, blocks, ratio),
            block=self.block,
            span=self.block,
            file_size=self.fsize,
            reserved=[(0, MiB, "headers"), *reserved, (offset, offset + length, "BAT")],
        )

    def _present(
        self, offset: int, entries: int, blocks: int, ratio: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        group = ratio + 1  # ratio payload entries, then one sector-bitmap entry
        step = group * max(1, TABLE_CHUNK // group)
        for first, chunk in table_chunks(self.reader, offset, entries, "<u8", step):
            if not chunk.any():  # NOT_PRESENT throughout (a sparse disk's BAT is mostly holes)
                continue
            padded = np.zeros(-(-len(chunk) // group) * group, dtype=np.uint64)
            padded[: len(chunk)] = chunk
            base = first // group * ratio
            payload = padded.reshape(-1, group)[:, :ratio].ravel()[: max(0, blocks - base)]
            states = (payload & np.uint64(7)).astype(np.int64)
            if (states == L.PARTIALLY_PRESENT).any():
                raise UnsupportedFormatError(
                    self.name, "VHDX block partially present: differencing data is not supported"
                )
            bad = (states > L.UNMAPPED) & (states < L.FULLY_PRESENT)  # 4 and 5 mean nothing
            if bad.any():
                raise self._bad(
                    f"VHDX BAT entry for block {base + int(np.argmax(bad))} has a bad state"
                )
            (hits,) = np.nonzero(states == L.FULLY_PRESENT)
            where = (payload[hits] & np.uint64(L.OFFSET_MASK)).astype(np.int64)
            yield hits + base, where

    # -- access
    def read(self, offset: int, length: int) -> bytes:
        check_read(self.name, offset, length, self.virtual_size)
        return read_mapped(self.reader, offset, length, self.block, self.alloc.locate)

    def extents(self) -> ExtentMap:
        return self.alloc.extents(self.virtual_size)

    def info(self) -> dict:
        return {
            "block_size": self.block,
            "logical_sector_size": self.logical,
            "physical_sector_size": self.physical,
            "allocated_blocks": len(self.alloc),
            "header_sequence": self.seq,
            "log_entries_replayed": self.replayed,
            "disk_id": str(self.disk_id) if self.disk_id else None,
        }

    def check(self) -> list[str]:
        """Blocks past the file end or over the headers, log, metadata, BAT or each other are
        refused when the image is opened (as qemu does for the regions)."""
        return []


# ------------------------------------------------------------------------------------ writer
class VhdxLayout(Layout):
    fixed: bool = False
    block: int = 8 * MiB
    blocks: range | list[int]
    data_offset: int = 0


class VhdxDriver(FormatDriver):
    name = "vhdx"
    extensions = (".vhdx",)
    option_names = ("subformat", "block_size")

    def probe(self, head: bytes, size: int) -> bool:
        return head[:8] == L.FILE_SIG

    def open(self, reader: RangeReader) -> DiskImage:
        return VhdxImage(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        opts = self.check_options(options)
        refuse_delta("VHDX", extents, size)
        sub = choice(opts, "subformat", ("dynamic", "fixed"), "dynamic")
        vsize = -(-size // 512) * 512
        if vsize > L.MAX_SIZE:
            raise InvalidParameterError(f"disk of {size} bytes exceeds the VHDX limit of 64 TiB")
        block = (
            parse_size("block_size", opts["block_size"])
            if "block_size" in opts
            else default_block_size(vsize)
        )
        if block < MiB or block > 256 * MiB or block & (block - 1):
            raise InvalidParameterError(
                f"option block_size={block} must be a power of two from 1M to 256M"
            )
        count = -(-vsize // block)
        ratio = L.chunk_ratio(block, 512)
        # qemu sizes an empty disk's BAT with 32-bit wrap-around and refuses a smaller region
        entries = L.bat_entries(count, ratio) if count else 0xFFFFFFFF >> (ratio.bit_length() - 1)
        layout = VhdxLayout(virtual_size=vsize, extents=extents, total_size=0,
                            options={"subformat": sub, "block_size": str(block)})  # fmt: skip
        layout.fixed = sub == "fixed"
        layout.block = block
        layout.blocks = range(count) if layout.fixed else used_blocks(extents, block)
        layout.data_offset = BAT_OFFSET + max(MiB, -(-entries * 8 // MiB) * MiB)
        layout.total_size = layout.data_offset + len(layout.blocks) * block
        return layout

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        assert isinstance(layout, VhdxLayout)
        block = layout.block
        count = -(-layout.virtual_size // block)
        ratio = L.chunk_ratio(block, 512)
        bat_length = layout.data_offset - BAT_OFFSET
        out.write(L.file_identifier("hypersdk"))
        for seq, at in enumerate(L.HEADER_OFFSETS, start=1):
            out.write(L.make_header(seq, LOG_OFFSET, LOG_LENGTH))
            out.write_zeros(at + 64 * L.KiB - at - L.HEADER_SIZE)
        regions = L.make_region_table(
            [(L.BAT_GUID, BAT_OFFSET, bat_length), (L.METADATA_GUID, METADATA_OFFSET, MiB)]
        )
        out.write(regions)
        out.write(regions)
        out.write_zeros(LOG_OFFSET + LOG_LENGTH - L.REGION_OFFSETS[1] - L.REGION_SIZE)
        meta = L.make_metadata(block, layout.virtual_size, uuid.uuid4(), 4096)
        out.write(meta)
        out.write_zeros(METADATA_LENGTH - len(meta))
        written = self._write_bat(layout, out, count, ratio)
        out.write_zeros(bat_length - written)
        if layout.fixed:
            emit_flat(source, layout.extents, out, count * block, progress)
        else:
            emit_blocks(source, layout.extents, block, out, progress)

    @staticmethod
    def _write_bat(layout: VhdxLayout, out: Sink, count: int, ratio: int) -> int:
        """Emit the BAT a few thousand chunks at a time (bounded memory for 64 TiB disks);
        all-zero stretches become holes. Returns the bytes emitted."""
        used = np.asarray(layout.blocks, dtype=np.int64) if not layout.fixed else None
        total = L.bat_entries(count, ratio) * 8
        step = ratio * max(1, (1 << 20) // ratio)
        written = 0
        for p0 in range(0, count, step):
            p1 = min(count, p0 + step)
            payload = np.zeros(-(-(p1 - p0) // ratio) * ratio, dtype=np.uint64)
            if used is None:
                ranks = np.arange(p0, p1, dtype=np.int64)
                payload[: p1 - p0] = (layout.data_offset + ranks * layout.block) | L.FULLY_PRESENT
            else:
                lo, hi = np.searchsorted(used, [p0, p1])
                ranks = np.arange(lo, hi, dtype=np.int64)
                payload[used[lo:hi] - p0] = (
                    layout.data_offset + ranks * layout.block
                ) | L.FULLY_PRESENT
            table = np.zeros((len(payload) // ratio, ratio + 1), dtype="<u8")
            table[:, :ratio] = payload.reshape(-1, ratio)
            data = table.tobytes()[: total - written]
            if table.any():
                out.write(data)
            else:
                out.write_zeros(len(data))
            written += len(data)
        return written


DRIVER = VhdxDriver()
