"""VMDK writers for three subformats, each emitting strictly in order into a Sink.

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

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._deflate import deflate, worth_deflating
from hypersdk.formats._vmdk_descriptor import ExtentLine, build_descriptor
from hypersdk.formats._vmdk_layout import ceil_div as _ceil
from hypersdk.formats.base import Layout, Progress, Readable
from hypersdk.formats.raw import write_sparse
from hypersdk.io import IO_CHUNK, Sink, read_ahead, read_pieces

SECTOR = L.SECTOR
COMPRESS_LEVEL = 6  # zlib's default, what qemu and VMware use
IN_FLIGHT = 3  # 4 MiB chunks being deflated at once


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


def grain_runs(extents: ExtentMap) -> list[tuple[int, int, int]]:
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


def write(source: Readable, lo: VmdkLayout, out: Sink, progress: Progress | None) -> None:
    """Emit ``lo`` (from ``_vmdk_plan.plan``) with the bytes of ``source``, in order."""
    start = out.tell()
    if lo.subformat == "monolithicSparse":
        _write_sparse(source, lo, out, progress)
    elif lo.subformat == "streamOptimized":
        _write_stream(source, lo, out, progress)
    else:
        _write_flat(source, lo, out, progress)
    lo.used_size = out.tell() - start


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
def sparse_geometry(lo: VmdkLayout) -> dict[str, int]:
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
    g = sparse_geometry(lo)
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
def stream_overhead(lo: VmdkLayout) -> int:
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
