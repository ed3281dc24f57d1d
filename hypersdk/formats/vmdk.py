"""VMDK (VMware's disk format): reader for the hosted subformats, streaming writer for three.

Read: monolithicSparse, streamOptimized (footer at EOF-1024 when the header says GD_AT_END),
monolithicFlat / twoGbMaxExtentFlat / vmfs (a text descriptor naming flat extents) and
twoGbMaxExtentSparse (a descriptor naming several sparse extents). Extent files are resolved
relative to the descriptor's directory; absolute names and ``..`` are refused.

Write (option ``subformat``):

* ``monolithicSparse`` (default): header, embedded descriptor, redundant GD + GTs, GD + GTs, then
  the grains touched by data, in guest order. The layout is arithmetic over the runs of data
  grains (like qemu's: every grain table preallocated), so ``plan`` gives the exact size.
* ``streamOptimized``: header (gdOffset = GD_AT_END), descriptor, then every non-zero grain
  deflated behind a grain marker; each grain table follows its 512 grains behind a GT marker,
  then the GD, the footer (the header again, with the real gdOffset) and the end-of-stream
  marker. Sizes depend on compression, so nothing is known up front and nothing needs to be:
  the tables come after the data they point to, which fits the in-order Sink. Grains are
  deflated on two threads (zlib releases the GIL) with a bounded number of chunks in flight.
  ``Layout.total_size`` is an upper bound here; ``VmdkLayout.used_size`` is exact after write.
* ``monolithicFlat``: the main stream is the flat extent (``<name>-flat.vmdk``: the guest bytes,
  sparse); the descriptor is a side file. It must name the extent file, which only the caller
  knows, so ``VmdkLayout.bind_output(path)`` fills ``extra_files`` (``convert_image`` calls it).
"""

from __future__ import annotations

import bisect
import os
import re
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hypersdk.errors import (
    FormatError,
    HyperSDKError,
    InvalidParameterError,
    UnsupportedFormatError,
)
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._deflate import deflate, worth_deflating
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.formats.raw import write_sparse
from hypersdk.io import IO_CHUNK, FileRangeReader, RangeReader, Sink, read_ahead, read_pieces

SECTOR = L.SECTOR
COMPRESS_LEVEL = 6  # zlib's default, what qemu and VMware use
MAX_CAPACITY = 1 << 50  # 1 PiB: bigger than any VMDK (62 TB limit); protects the arithmetic
GT_CACHE = 1024  # grain tables kept decoded (2 KiB each at 512 entries)
EAGER_GT_BYTES = 16 * 1024 * 1024  # validate every grain table at open when they are this small
IN_FLIGHT = 3  # 4 MiB chunks being deflated at once

Opener = Callable[[str], RangeReader]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------- descriptor
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$', re.IGNORECASE
)


@dataclass
class ExtentLine:
    access: str
    sectors: int
    kind: str  # SPARSE, FLAT, VMFS, ZERO
    filename: str | None
    offset: int  # sectors into the file (flat extents)


@dataclass
class Descriptor:
    fields: dict[str, str]
    extents: list[ExtentLine]

    @property
    def create_type(self) -> str:
        return self.fields.get("createtype", "")


def parse_descriptor(text: str, name: str) -> Descriptor:
    """Parse a text descriptor (``key = "value"`` lines and extent lines)."""
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for raw in text.splitlines():
        line = raw.strip().rstrip("\x00")
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            extents.append(
                ExtentLine(
                    m.group(1).upper(),
                    int(m.group(2)),
                    m.group(3).upper(),
                    m.group(4),
                    int(m.group(5) or 0),
                )
            )
            continue
        if "=" in line:
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip().strip('"')
            continue
        raise FormatError(name, f"descriptor line not understood: {line[:80]!r}")
    return Descriptor(fields, extents)


def build_descriptor(
    create_type: str,
    extents: list[ExtentLine],
    size: int,
    adapter: str,
    hwversion: int,
    cid: int,
) -> str:
    cyl, heads, spt = L.chs_geometry(size)
    if adapter == "ide":  # IDE geometry caps at 16 heads
        heads = 16
        cyl = max(1, min(size // SECTOR // (heads * spt), 16383))
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        "",
        "# Extent description",
    ]
    for e in extents:
        tail = f' "{e.filename}"' + (f" {e.offset}" if e.kind == "FLAT" else "")
        lines.append(f"{e.access} {e.sectors} {e.kind}{tail}")
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{hwversion}"',
        f'ddb.geometry.cylinders = "{cyl}"',
        f'ddb.geometry.heads = "{heads}"',
        f'ddb.geometry.sectors = "{spt}"',
        f'ddb.adapterType = "{adapter}"',
        f'ddb.uuid.image = "{uuid.UUID(int=cid * 0x100000001 << 64 | cid)}"',
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- sparse read
class SparseExtent:
    """One hosted sparse extent (KDMV header) inside ``reader`` (which it does not own)."""

    def __init__(self, reader: RangeReader, name: str):
        self.r = reader
        self.name = name
        self.file_size = reader.size
        self.descriptor: Descriptor | None = None
        self._gt_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._open()

    def _bad(self, problem: str) -> FormatError:
        return FormatError(self.name, problem)

    def _read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self._bad(
                f"{what} at {offset}+{length} lies beyond the end of the file "
                f"({self.file_size} bytes): truncated or corrupt"
            )
        return self.r.read(offset, length)

    def _open(self) -> None:
        if self.file_size < SECTOR:
            raise self._bad(f"only {self.file_size} bytes: too short for a VMDK sparse header")
        head = self.r.read(0, SECTOR)
        if head[:4] != L.MAGIC_BYTES:
            raise self._bad("no VMDK sparse magic (KDMV): not a sparse extent")
        h = L.SparseHeader.unpack(head)
        if h.gd_offset == L.GD_AT_END:
            h = self._footer()
        self.header = h
        if h.version not in (1, 2, 3):
            raise UnsupportedFormatError(self.name, f"VMDK sparse version {h.version} unsupported")
        if not 1 <= h.grain_size <= L.MAX_GRAIN_SECTORS:
            raise self._bad(f"grain size of {h.grain_size} sectors is invalid")
        if not 1 <= h.num_gtes_per_gt <= L.MAX_GTES_PER_GT:
            raise self._bad(f"{h.num_gtes_per_gt} entries per grain table is invalid")
        if h.capacity * SECTOR > MAX_CAPACITY:
            raise self._bad(f"capacity of {h.capacity} sectors is implausible")
        self.compressed = bool(h.flags & L.FLAG_COMPRESSED)
        self.markers = bool(h.flags & L.FLAG_MARKERS)
        if self.compressed and h.compress_algorithm != L.COMPRESS_DEFLATE:
            raise UnsupportedFormatError(
                self.name, f"compression algorithm {h.compress_algorithm} unsupported"
            )
        self.grain_bytes = h.grain_size * SECTOR
        self.gt_entries = h.num_gtes_per_gt
        self.capacity = h.capacity * SECTOR
        self.gd_entries = _ceil(h.capacity, h.grain_size * h.num_gtes_per_gt)
        gd = self._read(h.gd_offset * SECTOR, self.gd_entries * 4, "grain directory")
        self.gd = np.frombuffer(gd, dtype="<u4").astype(np.int64)
        gt_bytes = self.gt_entries * 4
        bad = (self.gd > 0) & ((self.gd * SECTOR + gt_bytes) > self.file_size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._bad(
                f"grain table {i} at sector {int(self.gd[i])} lies beyond the end of the file "
                f"({self.file_size} bytes): truncated or corrupt"
            )
        if h.descriptor_offset and h.descriptor_size:
            if h.descriptor_size * SECTOR > L.MAX_DESCRIPTOR_BYTES:
                raise self._bad(f"embedded descriptor of {h.descriptor_size} sectors is too big")
            raw = self._read(
                h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR, "embedded descriptor"
            )
            self.descriptor = _decode_descriptor(raw.split(b"\x00", 1)[0], self.name)
        if int(np.count_nonzero(self.gd)) * gt_bytes <= EAGER_GT_BYTES:
            for i in np.flatnonzero(self.gd).tolist():
                self._gt(i)

    def _footer(self) -> L.SparseHeader:
        if self.file_size < 4 * SECTOR:
            raise self._bad("header says the grain directory is at the end, but there is no footer")
        tail = self.r.read(self.file_size - 3 * SECTOR, 3 * SECTOR)
        fm = L.META_MARKER.unpack_from(tail, 0)
        eos = L.META_MARKER.unpack_from(tail, 2 * SECTOR)
        if fm[2] != L.MARKER_FOOTER or fm[1] != 0 or tail[SECTOR : SECTOR + 4] != L.MAGIC_BYTES:
            raise self._bad("streamOptimized footer missing at EOF-1024 (truncated?)")
        if eos != (0, 0, L.MARKER_EOS):
            raise self._bad("streamOptimized end-of-stream marker missing (truncated?)")
        h = L.SparseHeader.unpack(tail[SECTOR : 2 * SECTOR])
        if h.gd_offset == L.GD_AT_END:
            raise self._bad("footer does not give the grain directory offset")
        return h

    def _gt(self, i: int) -> np.ndarray | None:
        """Grain table ``i`` (int64 entries), or None when the GD has no table there."""
        cached = self._gt_cache.get(i)
        if cached is not None:
            self._gt_cache.move_to_end(i)
            return cached
        sector = int(self.gd[i])
        if sector == 0:
            return None
        raw = self._read(sector * SECTOR, self.gt_entries * 4, f"grain table {i}")
        gt = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        need = 12 if self.markers else (SECTOR if self.compressed else self.grain_bytes)
        bad = (gt > 1) & ((gt * SECTOR + need) > self.file_size)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise self._bad(
                f"grain {i * self.gt_entries + j} at sector {int(gt[j])} lies beyond the end "
                f"of the file ({self.file_size} bytes): truncated or corrupt"
            )
        self._gt_cache[i] = gt
        if len(self._gt_cache) > GT_CACHE:
            self._gt_cache.popitem(last=False)
        return gt

    def _entry(self, grain: int) -> int:
        gt = self._gt(grain // self.gt_entries)
        return 0 if gt is None else int(gt[grain % self.gt_entries])

    def _grain(self, grain: int, sector: int) -> bytes:
        gb = self.grain_bytes
        if not self.compressed:
            return self._read(sector * SECTOR, gb, f"grain {grain}")
        off = sector * SECTOR
        if self.markers:
            lba, size = L.GRAIN_MARKER.unpack(self._read(off, 12, f"grain marker {grain}"))
            if lba != grain * self.header.grain_size:
                raise self._bad(
                    f"grain marker at sector {sector} is for lba {lba}, not grain {grain}"
                )
            if size > gb + 4096:
                raise self._bad(f"compressed grain {grain} claims {size} bytes")
            off += 12
        else:
            size = min(gb + 4096, self.file_size - off)
        data = self._read(off, size, f"compressed grain {grain}")
        try:
            d = zlib.decompressobj()
            out = d.decompress(data, gb)
        except zlib.error as exc:
            raise self._bad(f"grain {grain} does not inflate: {exc}") from None
        if len(out) < gb:
            out += bytes(gb - len(out))
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of this extent's guest range (the caller checked the bounds)."""
        gb = self.grain_bytes
        parts: list = []
        pos, end = offset, offset + length
        while pos < end:
            g = pos // gb
            start_in = pos - g * gb
            take = min(gb - start_in, end - pos)
            sector = self._entry(g)
            if sector <= 1:
                parts.append(bytes(take))
            elif not self.compressed:
                # coalesce physically contiguous grains into one read
                n = 1
                while pos + take < end:
                    nxt = self._entry(g + n)
                    if nxt != sector + n * self.header.grain_size:
                        break
                    take = min(take + gb, end - pos)
                    n += 1
                parts.append(self._read(sector * SECTOR + start_in, take, f"grain {g}"))
            else:
                parts.append((g, sector, start_in, take))  # inflated below, in parallel
            pos += take
        jobs = [i for i, p in enumerate(parts) if isinstance(p, tuple)]
        if jobs:

            def inflate(job: tuple[int, int, int, int]) -> bytes:
                g, sector, start_in, take = job
                data = self._grain(g, sector)
                return data if take == len(data) else data[start_in : start_in + take]

            todo = [parts[i] for i in jobs]
            done = _inflate_pool().map(inflate, todo) if len(todo) >= 4 else map(inflate, todo)
            for i, data in zip(jobs, done, strict=True):
                parts[i] = data
        return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[return-value]

    def data_extents(self, base: int = 0) -> Iterator[Extent]:
        """Guest ranges of allocated (non-zero) grains, offset by ``base``, in order."""
        gb, per = self.grain_bytes, self.gt_entries
        for i in np.flatnonzero(self.gd).tolist():
            gt = self._gt(i)
            if gt is None:
                continue
            mask = gt > 1
            if not mask.any():
                continue
            padded = np.concatenate(([False], mask, [False])).astype(np.int8)
            edges = np.flatnonzero(np.diff(padded))
            for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
                s = (i * per + a) * gb
                e = min((i * per + b) * gb, self.capacity)
                if e > s:
                    yield Extent(base + s, e - s)

    def check(self) -> list[str]:
        problems = []
        for i in np.flatnonzero(self.gd).tolist():
            try:
                self._gt(i)
            except FormatError as exc:
                problems.append(exc.problem)
        return problems


_POOL: ThreadPoolExecutor | None = None


def _inflate_pool() -> ThreadPoolExecutor:
    """Two threads shared by every reader: inflating grains is CPU-bound, zlib drops the GIL."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmdk-inflate")
    return _POOL


def _decode_descriptor(raw: bytes, name: str) -> Descriptor:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(name, "VMDK descriptor is not UTF-8 text") from None
    return parse_descriptor(text, name)


# ------------------------------------------------------------------------------------ image
@dataclass
class _Part:
    start: int  # guest byte offset
    length: int
    kind: str  # SPARSE, FLAT, ZERO
    sparse: SparseExtent | None = None
    reader: RangeReader | None = None
    file_offset: int = 0


class VmdkImage(DiskImage):
    format = "vmdk"

    def __init__(
        self,
        reader: RangeReader,
        parts: list[_Part],
        descriptor: Descriptor | None,
        owned: list[RangeReader],
    ):
        super().__init__(reader, sum(p.length for p in parts))
        self.parts = parts
        self.descriptor = descriptor
        self._owned = owned
        self._starts = [p.start for p in parts]

    def extents(self) -> ExtentMap:
        out = ExtentCollector(self.virtual_size)
        for p in self.parts:  # in guest order
            if p.kind == "SPARSE":
                out.extend(p.sparse.data_extents(p.start))  # type: ignore[union-attr]
            elif p.kind == "FLAT":
                alloc = getattr(p.reader, "allocated", None)
                if alloc is None or p.file_offset:
                    out.add(p.start, p.length)
                else:
                    for e in alloc():
                        out.add(p.start + e.offset, min(e.end, p.length) - e.offset)
        return out.build()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        parts: list[bytes] = []
        pos, end = offset, offset + length
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            p = self.parts[i]
            take = min(end, p.start + p.length) - pos
            rel = pos - p.start
            if p.kind == "SPARSE":
                parts.append(p.sparse.read(rel, take))  # type: ignore[union-attr]
            elif p.kind == "FLAT":
                parts.append(p.reader.read(p.file_offset + rel, take))  # type: ignore[union-attr]
            else:
                parts.append(bytes(take))
            pos += take
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def info(self) -> dict:
        d = self.descriptor.fields if self.descriptor else {}
        first = next((p.sparse for p in self.parts if p.sparse), None)
        out = {
            "subformat": d.get("createtype", "monolithicSparse"),
            "adapter_type": d.get("ddb.adaptertype"),
            "hwversion": d.get("ddb.virtualhwversion"),
            "extents": len(self.parts),
        }
        if first is not None:
            out["grain_size"] = first.grain_bytes
            out["compressed"] = first.compressed
        return out

    def check(self) -> list[str]:
        problems: list[str] = []
        for p in self.parts:
            if p.sparse is not None:
                problems.extend(p.sparse.check())
        return problems

    def close(self) -> None:
        for r in self._owned:
            r.close()
        self._owned = []
        super().close()


def _default_opener(base: RangeReader) -> Opener:
    directory = os.path.dirname(os.path.abspath(base.name))

    def open_sibling(name: str) -> RangeReader:
        path = os.path.join(directory, name)
        try:
            return FileRangeReader(path)
        except HyperSDKError as exc:
            raise FormatError(base.name, f"extent file {name!r}: {exc}") from None

    return open_sibling


def _safe_extent_name(name: str, descriptor_name: str) -> str:
    norm = name.replace("\\", "/")
    if not norm or norm.startswith("/") or ".." in norm.split("/") or re.match(r"^\w:", norm):
        raise FormatError(
            descriptor_name, f"extent file {name!r} must be a relative name without '..'"
        )
    return norm


def descriptor_text(raw: bytes) -> bytes | None:
    """The text of a descriptor file, or None if ``raw`` is not text. Like qemu and VMware, the
    text ends at the first NUL, and only NULs and whitespace may follow: qemu-img 7.2 now and
    then pads a descriptor to 512 bytes as "...\\n\\0\\n\\0\\0...", which it reads back fine."""
    text, _, rest = raw.partition(b"\x00")
    return None if rest.strip(b"\x00 \t\r\n") else text


def open_vmdk(reader: RangeReader, opener: Opener | None = None) -> VmdkImage:
    """Open a sparse VMDK or a text descriptor; ``opener`` resolves extent file names."""
    name = reader.name
    head = reader.read(0, min(reader.size, SECTOR))
    if head[:4] == L.MAGIC_BYTES:
        sp = SparseExtent(reader, name)
        desc = sp.descriptor
        if desc is not None:
            ct = desc.create_type
            if ct and ct not in L.READ_CREATE_TYPES:
                raise UnsupportedFormatError(name, f"VMDK createType {ct!r} is unsupported")
            _refuse_parent(desc, name)
        return VmdkImage(reader, [_Part(0, sp.capacity, "SPARSE", sp)], desc, [])
    if reader.size > L.MAX_DESCRIPTOR_BYTES:
        raise FormatError(name, "neither a sparse VMDK nor a descriptor (too big for text)")
    text = descriptor_text(reader.read(0, reader.size))
    if text is None:
        raise FormatError(name, "not a VMDK: no sparse magic and not a text descriptor")
    desc = _decode_descriptor(text, name)
    ct = desc.create_type
    if not ct:
        raise FormatError(name, "VMDK descriptor has no createType")
    if ct not in L.READ_CREATE_TYPES:
        raise UnsupportedFormatError(name, f"VMDK createType {ct!r} is unsupported")
    _refuse_parent(desc, name)
    if not desc.extents:
        raise FormatError(name, "VMDK descriptor lists no extents")
    opener = opener or _default_opener(reader)
    parts: list[_Part] = []
    owned: list[RangeReader] = []
    pos = 0
    try:
        for e in desc.extents:
            length = e.sectors * SECTOR
            if length > MAX_CAPACITY or pos + length > MAX_CAPACITY:
                raise FormatError(name, f"extent of {e.sectors} sectors is implausible")
            if e.kind == "ZERO":
                parts.append(_Part(pos, length, "ZERO"))
            elif e.kind in ("FLAT", "VMFS", "SPARSE"):
                if not e.filename:
                    raise FormatError(name, f"{e.kind} extent without a file name")
                sub = opener(_safe_extent_name(e.filename, name))
                owned.append(sub)
                if e.kind == "SPARSE":
                    sp = SparseExtent(sub, sub.name)
                    if sp.capacity < length:
                        raise FormatError(
                            sub.name,
                            f"sparse extent holds {sp.capacity} bytes, descriptor says {length}",
                        )
                    parts.append(_Part(pos, length, "SPARSE", sp))
                else:
                    if sub.size < (e.offset * SECTOR) + length:
                        raise FormatError(
                            sub.name,
                            f"flat extent is {sub.size} bytes, descriptor needs "
                            f"{e.offset * SECTOR + length}: truncated",
                        )
                    parts.append(
                        _Part(pos, length, "FLAT", reader=sub, file_offset=e.offset * SECTOR)
                    )
            else:
                raise UnsupportedFormatError(name, f"VMDK extent type {e.kind} is unsupported")
            pos += length
    except BaseException:
        for r in owned:
            r.close()
        raise
    return VmdkImage(reader, parts, desc, owned)


def _refuse_parent(desc: Descriptor, name: str) -> None:
    parent = desc.fields.get("parentcid", "ffffffff").lower()
    if parent != "ffffffff" or "parentfilenamehint" in desc.fields:
        raise UnsupportedFormatError(
            name, "VMDK delta disks (with a parent) are unsupported: convert the chain first"
        )


# ----------------------------------------------------------------------------------- writer
@dataclass
class VmdkLayout(Layout):
    subformat: str = "monolithicSparse"
    adapter_type: str = "lsilogic"
    hwversion: int = 4
    compression_level: int = COMPRESS_LEVEL
    cid: int = 0
    capacity_sectors: int = 0
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first grain, count, rank)
    data_grains: int = 0
    gt_count: int = 0
    used_size: int = 0  # exact bytes written (set by write)
    size_exact: bool = True  # False for streamOptimized: total_size is then an upper bound

    def bind_output(self, path: str | os.PathLike) -> None:
        """monolithicFlat: name the descriptor after the extent file written to ``path``."""
        if self.subformat != "monolithicFlat":
            return
        base = os.path.basename(os.fspath(path))
        if base.endswith("-flat.vmdk"):
            desc_name = base[: -len("-flat.vmdk")] + ".vmdk"
        else:
            desc_name = (base[:-5] if base.endswith(".vmdk") else base) + "-descriptor.vmdk"
        text = build_descriptor(
            "monolithicFlat",
            [ExtentLine("RW", self.capacity_sectors, "FLAT", base, 0)],
            self.virtual_size,
            self.adapter_type,
            self.hwversion,
            self.cid,
        )
        self.extra_files = {desc_name: text.encode()}


GRAIN = L.DEFAULT_GRAIN_SECTORS * SECTOR
_ZERO_GRAIN = bytes(GRAIN)


def _grain_runs(extents: ExtentMap) -> list[tuple[int, int, int]]:
    """(first grain, count, rank) of the grains touched by data extents, in guest order."""
    runs: list[tuple[int, int, int]] = []
    rank = 0
    for e in extents.data():
        a, b = e.offset // GRAIN, _ceil(e.end, GRAIN)
        if runs and a <= runs[-1][0] + runs[-1][1]:
            f, c, r = runs[-1]
            new_end = max(f + c, b)
            rank += new_end - (f + c)
            runs[-1] = (f, new_end - f, r)
        else:
            runs.append((a, b - a, rank))
            rank += b - a
    return runs


class VmdkDriver(FormatDriver):
    name = "vmdk"
    extensions = (".vmdk",)
    option_names = ("subformat", "adapter_type", "hwversion", "compression_level")
    probe_priority = 5

    def probe(self, head: bytes, size: int) -> bool:
        if head[:4] == L.MAGIC_BYTES:
            return True
        text = head[:1024]
        return text.startswith(b"# Disk DescriptorFile") or (
            b"createType=" in text and descriptor_text(text) is not None
        )

    def open(self, reader: RangeReader, opener: Opener | None = None) -> DiskImage:
        return open_vmdk(reader, opener)

    # -- plan ------------------------------------------------------------------------------
    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> VmdkLayout:
        opts = self.check_options(options)
        sub = opts.get("subformat", "monolithicSparse")
        match = {s.lower(): s for s in L.SUBFORMATS}.get(sub.lower())
        if match is None:
            raise InvalidParameterError(
                f"vmdk subformat {sub!r} cannot be written (choose {', '.join(L.SUBFORMATS)})"
            )
        adapter = opts.get("adapter_type", "lsilogic")
        if adapter not in L.ADAPTERS:
            raise InvalidParameterError(
                f"vmdk adapter_type {adapter!r} unknown (choose {', '.join(L.ADAPTERS)})"
            )
        try:
            hw = int(opts.get("hwversion", "4"))
            level = int(opts.get("compression_level", str(COMPRESS_LEVEL)))
        except ValueError:
            raise InvalidParameterError(
                "vmdk hwversion and compression_level are integers"
            ) from None
        if not 3 <= hw <= 21:
            raise InvalidParameterError(f"vmdk hwversion {hw} is out of range (3..21)")
        if not 1 <= level <= 9:
            raise InvalidParameterError(f"vmdk compression_level {level} is out of range (1..9)")
        if extents.size != size:
            raise FormatError(None, "extent map size differs from the disk size")
        if size > MAX_CAPACITY:
            raise InvalidParameterError(f"disk of {size} bytes is too big for VMDK")
        cap = _ceil(size, SECTOR)
        runs = _grain_runs(extents)
        data_grains = sum(c for _, c, _ in runs)
        gt_count = _ceil(cap, L.DEFAULT_GRAIN_SECTORS * L.GTES_PER_GT)
        cid = int.from_bytes(os.urandom(4), "little") | 1
        lo = VmdkLayout(
            virtual_size=size,
            extents=extents,
            total_size=0,
            options=opts,
            subformat=match,
            adapter_type=adapter,
            hwversion=hw,
            compression_level=level,
            cid=cid,
            capacity_sectors=cap,
            runs=runs,
            data_grains=data_grains,
            gt_count=gt_count,
        )
        if match == "monolithicSparse":
            lo.total_size = _sparse_geometry(lo)["total"] * SECTOR
        elif match == "monolithicFlat":
            lo.total_size = cap * SECTOR
            lo.not_streamable = (
                "vmdk subformat=monolithicFlat is a flat extent plus a descriptor file that names "
                "it, which one export object cannot carry: export subformat=monolithicSparse or "
                "streamOptimized, or make a flat VMDK locally with `hyperctl convert`"
            )
        else:
            # upper bound: every grain stored (deflate can grow ~0.03% + marker), every table
            gd_sectors = _ceil(gt_count * 4, SECTOR)
            per_grain = _ceil(12 + GRAIN + GRAIN // 1000 + 64, SECTOR)
            lo.total_size = SECTOR * (
                _stream_overhead(lo)
                + data_grains * per_grain
                + gt_count * (1 + 4)
                + 1
                + gd_sectors
                + 3
            )
            lo.size_exact = False
        return lo

    # -- write -----------------------------------------------------------------------------
    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        if not isinstance(layout, VmdkLayout):
            raise InvalidParameterError("vmdk write needs a layout from vmdk plan")
        start = out.tell()
        if layout.subformat == "monolithicSparse":
            _write_sparse(source, layout, out, progress)
        elif layout.subformat == "streamOptimized":
            _write_stream(source, layout, out, progress)
        else:
            _write_flat(source, layout, out, progress)
        layout.used_size = out.tell() - start


def _pieces(lo: VmdkLayout) -> Iterator[Extent]:
    """Guest ranges of the data grains, cut at IO_CHUNK boundaries, clipped to the disk."""
    for first, count, _ in lo.runs:
        pos, end = first * GRAIN, min(lo.virtual_size, (first + count) * GRAIN)
        while pos < end:
            stop = min(end, (pos // IO_CHUNK + 1) * IO_CHUNK)
            yield Extent(pos, stop - pos)
            pos = stop


def _descriptor_sectors(lo: VmdkLayout, create_type: str) -> tuple[bytes, int]:
    text = build_descriptor(
        create_type,
        [ExtentLine("RW", lo.capacity_sectors, "SPARSE", "disk.vmdk", 0)],
        lo.virtual_size,
        lo.adapter_type,
        lo.hwversion,
        lo.cid,
    ).encode()
    sectors = max(L.DESCRIPTOR_SECTORS, _ceil(len(text), SECTOR))
    return text + bytes(sectors * SECTOR - len(text)), sectors


# -- monolithicSparse
def _sparse_geometry(lo: VmdkLayout) -> dict[str, int]:
    gd_sectors = _ceil(lo.gt_count * 4, SECTOR)
    gt_sectors = lo.gt_count * (L.GTES_PER_GT * 4 // SECTOR)
    desc = L.DESCRIPTOR_SECTORS
    rgd = 1 + desc
    gd = rgd + gd_sectors + gt_sectors
    overhead = (
        _ceil(gd + gd_sectors + gt_sectors, L.DEFAULT_GRAIN_SECTORS) * L.DEFAULT_GRAIN_SECTORS
    )
    return {
        "rgd": rgd,
        "gd": gd,
        "gd_sectors": gd_sectors,
        "overhead": overhead,
        "total": overhead + lo.data_grains * L.DEFAULT_GRAIN_SECTORS,
    }


def _gt_batches(lo: VmdkLayout, base_sector: int, batch: int = 1024) -> Iterator[np.ndarray]:
    """Grain-table entries for every table, ``batch`` tables at a time (bounded memory)."""
    runs = lo.runs
    per = L.GTES_PER_GT
    k = 0
    for first_gt in range(0, lo.gt_count, batch):
        n = min(batch, lo.gt_count - first_gt)
        lo_g, hi_g = first_gt * per, (first_gt + n) * per
        arr = np.zeros(n * per, dtype="<u4")
        while k < len(runs) and runs[k][0] + runs[k][1] <= lo_g:
            k += 1
        j = k
        while j < len(runs) and runs[j][0] < hi_g:
            f, c, rank = runs[j]
            a, b = max(lo_g, f), min(hi_g, f + c)
            r0 = rank + (a - f)
            arr[a - lo_g : b - lo_g] = base_sector + (
                np.arange(r0, r0 + b - a, dtype=np.int64) * L.DEFAULT_GRAIN_SECTORS
            )
            j += 1
        yield arr


def _write_sparse(source: Readable, lo: VmdkLayout, out: Sink, progress: Progress | None) -> None:
    g = _sparse_geometry(lo)
    if g["overhead"] * SECTOR > 0xFFFF_FFFF * SECTOR or g["total"] > 0xFFFF_FFFF:
        raise InvalidParameterError("image too big for 32-bit VMDK grain offsets")
    desc, desc_sectors = _descriptor_sectors(lo, "monolithicSparse")
    gt_sectors_each = L.GTES_PER_GT * 4 // SECTOR
    h = L.SparseHeader(
        version=1,
        flags=L.FLAG_NL_DETECT | L.FLAG_RGD,
        capacity=lo.capacity_sectors,
        grain_size=L.DEFAULT_GRAIN_SECTORS,
        descriptor_offset=1,
        descriptor_size=desc_sectors,
        num_gtes_per_gt=L.GTES_PER_GT,
        rgd_offset=g["rgd"],
        gd_offset=g["gd"],
        overhead=g["overhead"],
    )
    base = out.tell()
    out.write(h.pack())
    out.write(desc)
    for gd_at in (g["rgd"], g["gd"]):
        gts_at = gd_at + g["gd_sectors"]
        gd = (gts_at + np.arange(lo.gt_count, dtype=np.int64) * gt_sectors_each).astype("<u4")
        raw = gd.tobytes()
        out.write(raw)
        out.write_zeros(g["gd_sectors"] * SECTOR - len(raw))
        for batch in _gt_batches(lo, g["overhead"]):
            out.write(batch.tobytes())
    out.write_zeros(g["overhead"] * SECTOR - (out.tell() - base))
    for piece, data in read_pieces(source, _pieces(lo)):
        out.write(data)
        if len(data) % GRAIN:
            out.write_zeros(-len(data) % GRAIN)
        if progress:
            progress(piece.length)


# -- monolithicFlat
def _write_flat(source: Readable, lo: VmdkLayout, out: Sink, progress: Progress | None) -> None:
    data = ExtentMap(lo.virtual_size, lo.extents.data())
    write_sparse(source, data, lo.capacity_sectors * SECTOR, out, progress)


# -- streamOptimized
def _stream_overhead(lo: VmdkLayout) -> int:
    desc_sectors = max(L.DESCRIPTOR_SECTORS, 1)
    return _ceil(1 + desc_sectors, L.DEFAULT_GRAIN_SECTORS) * L.DEFAULT_GRAIN_SECTORS


def _deflate_grains(
    data: bytes, lo: int, hi: int, first_grain: int, level: int
) -> tuple[list[tuple[int, int]], bytes]:
    """Deflate each non-zero grain of ``data[lo:hi]`` behind its marker, padded to a sector.

    Returns ([(grain, sectors)], framed bytes). Grains whose sample does not deflate (random or
    encrypted data) are stored as deflate "stored" blocks (level 0): valid, and far cheaper.
    """
    index: list[tuple[int, int]] = []
    parts: list[bytes] = []
    gs = L.DEFAULT_GRAIN_SECTORS
    view = memoryview(data)
    for i in range(lo, hi, GRAIN):
        if i + GRAIN <= len(data):
            if data.startswith(_ZERO_GRAIN, i):  # memcmp, no copy
                continue
            grain: bytes | memoryview = view[i : i + GRAIN]
            sample = data[i : i + GRAIN : 16]
        else:
            grain = bytes(view[i:hi]) + bytes(GRAIN - (hi - i))
            if grain == _ZERO_GRAIN:
                continue
            sample = grain[::16]
        comp = deflate(grain, level if worth_deflating(sample) else 0)
        g = first_grain + (i - lo) // GRAIN
        rec_len = 12 + len(comp)
        pad = -rec_len % SECTOR
        parts.append(L.GRAIN_MARKER.pack(g * gs, len(comp)))
        parts.append(comp)
        if pad:
            parts.append(bytes(pad))
        index.append((g, (rec_len + pad) // SECTOR))
    return index, b"".join(parts)


def _write_stream(source: Readable, lo: VmdkLayout, out: Sink, progress: Progress | None) -> None:
    desc, desc_sectors = _descriptor_sectors(lo, "streamOptimized")
    overhead = _ceil(1 + desc_sectors, L.DEFAULT_GRAIN_SECTORS) * L.DEFAULT_GRAIN_SECTORS
    h = L.SparseHeader(
        version=3,
        flags=L.FLAG_NL_DETECT | L.FLAG_COMPRESSED | L.FLAG_MARKERS,
        capacity=lo.capacity_sectors,
        grain_size=L.DEFAULT_GRAIN_SECTORS,
        descriptor_offset=1,
        descriptor_size=desc_sectors,
        num_gtes_per_gt=L.GTES_PER_GT,
        rgd_offset=0,
        gd_offset=L.GD_AT_END,
        overhead=overhead,
        compress_algorithm=L.COMPRESS_DEFLATE,
    )
    base = out.tell()
    out.write(h.pack())
    out.write(desc)
    out.write_zeros((overhead - 1 - desc_sectors) * SECTOR)
    sector = overhead  # next free sector (relative to ``base``)
    per = L.GTES_PER_GT
    gd = np.zeros(lo.gt_count, dtype="<u4")
    gt = np.zeros(per, dtype="<u4")
    cur_gt = -1
    gt_sectors = per * 4 // SECTOR

    def flush_gt() -> None:
        nonlocal sector
        if cur_gt >= 0 and gt.any():
            out.write(L.meta_marker(gt_sectors, L.MARKER_GT))
            gd[cur_gt] = sector + 1
            out.write(gt.tobytes())
            sector += 1 + gt_sectors
        gt[:] = 0

    level = lo.compression_level
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmdk-deflate") as pool:
        pending: deque = deque()

        # Grain tables must follow their grains, so emit per grain table boundary: each
        # chunk is cut at grain-table boundaries (32 MiB divides by IO_CHUNK), and a table is
        # flushed before the first chunk of the next table is written.
        def drain() -> None:
            nonlocal sector, cur_gt
            piece, futs = pending.popleft()
            t = piece.offset // (per * GRAIN)
            if t != cur_gt:
                flush_gt()
                cur_gt = t
            for fut in futs:
                index, framed = fut.result()
                pos = sector
                for g, n in index:
                    gt[g % per] = pos
                    pos += n
                out.write(framed)
                sector = pos
            if progress:
                progress(piece.length)

        for piece, data in read_ahead(source, _pieces(lo)):
            data = data if isinstance(data, bytes) else bytes(data)
            first = piece.offset // GRAIN
            n = len(data)
            if n > 2 * GRAIN:
                half = (n // GRAIN // 2) * GRAIN
                futs = [
                    pool.submit(_deflate_grains, data, 0, half, first, level),
                    pool.submit(_deflate_grains, data, half, n, first + half // GRAIN, level),
                ]
            else:
                futs = [pool.submit(_deflate_grains, data, 0, n, first, level)]
            pending.append((piece, futs))
            if len(pending) > IN_FLIGHT:
                drain()
        while pending:
            drain()
    flush_gt()
    gd_sectors = _ceil(lo.gt_count * 4, SECTOR)
    out.write(L.meta_marker(gd_sectors, L.MARKER_GD))
    gd_at = sector + 1
    raw = gd.tobytes()
    out.write(raw)
    out.write_zeros(gd_sectors * SECTOR - len(raw))
    sector += 1 + gd_sectors
    h.gd_offset = gd_at
    out.write(L.meta_marker(1, L.MARKER_FOOTER))
    out.write(h.pack())
    out.write(L.meta_marker(0, L.MARKER_EOS))
    sector += 3
    if out.tell() - base != sector * SECTOR:
        raise AssertionError("streamOptimized writer lost track of its position")


DRIVER = VmdkDriver()
