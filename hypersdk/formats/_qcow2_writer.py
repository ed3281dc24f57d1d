"""QCOW2 writer: the planned layout and the ordered emission of its bytes.

Layout (decided by ``_qcow2_plan.plan`` from the extent map alone, emitted strictly in order):

    cluster 0          header, header extensions (backing format), backing file name
    L1 table           ceil(l1_size * 8 / cluster) clusters
    refcount table     sized for every cluster of the file
    refcount blocks    one per (cluster_size * 8 / 16) host clusters (16-bit refcounts)
    L2 tables          one per L1 entry that covers an allocated or zero cluster, in L1 order
    data clusters      in guest order

Every host cluster of the file is referenced exactly once, so the refcount blocks are just "1 up
to the end of the file" and the L2 entries are arithmetic over the runs of allocated clusters:
nothing per cluster is kept in memory.

Compression (``compression=zlib``) makes host offsets depend on compressed sizes that ``plan``
cannot know (it never sees the data), while the header, L1 and L2 tables must come first because
we never seek. So ``write`` makes two passes, compressing once: pass 1 deflates every data cluster
(4 MiB pieces, two in flight on two threads: zlib releases the GIL), keeps its compressed size (2
bytes per cluster, 4 above 64 KiB clusters) and spools the compressed bytes to an unlinked
temporary file (``_qcow2_pack.Spool``). Then the tables are built and emitted (offsets,
descriptors and refcounts are recomputed from the sizes, in vectorised chunks), and the emit pass
streams the spool, reading the clusters stored uncompressed again from the source (cheap, and
never spooled). A cluster whose 1-in-16 byte sample does not deflate at level 1 (random or
encrypted data) is stored uncompressed without trying: this skips most of the cost. ``plan`` can
only give an upper bound for a compressed image (every cluster uncompressed), so ``write`` pads
the end of the file with zeros up to ``total_size``: the padding lies beyond every referenced
cluster (qemu-img check stays clean) and becomes a hole on a local file;
``Qcow2Layout.used_size`` tells the meaningful length after write. Where the exact length
matters before writing (a sized upload), ``Qcow2Layout.measure(source)`` runs pass 1 ahead and
makes ``total_size`` exact; ``write`` then emits its spool (a second write compresses again and
refuses a source whose compressed sizes changed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import Extent
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats._deflate import deflate, worth_deflating
from hypersdk.formats._qcow2_layout import ceil_div as _ceil
from hypersdk.formats._qcow2_pack import PACK_CHUNK, Descriptors, Packer, Spool, size_dtype
from hypersdk.formats.base import Layout, Progress, Readable
from hypersdk.io import IO_CHUNK, Sink, read_ahead, read_pieces

REFCOUNT_ORDER = 4  # 16-bit refcounts, what qemu writes
COMPRESS_LEVEL = 6  # zlib's default, what qemu uses

DATA, ZERO = 1, 2  # kinds of a Run


@dataclass
class Run:
    first: int  # guest cluster
    count: int
    kind: int  # DATA or ZERO
    rank: int = 0  # index of the first cluster among all data clusters


@dataclass
class Meta:
    """Host placement of the metadata, in emission order; offsets in clusters."""

    l1_clusters: int
    rt_clusters: int
    rb_count: int
    l2_count: int
    data_clusters: int

    @property
    def l1(self) -> int:
        return 1

    @property
    def rt(self) -> int:
        return self.l1 + self.l1_clusters

    @property
    def rb(self) -> int:
        return self.rt + self.rt_clusters

    @property
    def l2(self) -> int:
        return self.rb + self.rb_count

    @property
    def data(self) -> int:
        return self.l2 + self.l2_count

    @property
    def total(self) -> int:
        return self.data + self.data_clusters


def place(cs: int, l1_clusters: int, l2_count: int, data_clusters: int) -> Meta:
    """Find refcount table/block counts that cover the file including themselves."""
    per_block = cs * 8 >> REFCOUNT_ORDER
    rt, rb = 1, 0
    while True:
        total = 1 + l1_clusters + rt + rb + l2_count + data_clusters
        rb2 = _ceil(total, per_block)
        rt2 = max(1, _ceil(rb2 * 8, cs))
        if rb2 <= rb and rt2 <= rt:
            return Meta(l1_clusters, rt, rb, l2_count, data_clusters)
        rb, rt = max(rb, rb2), max(rt, rt2)


@dataclass
class Qcow2Layout(Layout):
    cluster_bits: int = 16
    version: int = 3
    backing_file: str = ""
    backing_format: str = ""
    compression: bool = False
    runs: list[Run] = field(default_factory=list)
    l2_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    l1_size: int = 0
    data_clusters: int = 0
    meta: Meta | None = None
    used_size: int = 0  # bytes that matter (set by write; < total_size only when compressed)
    compressed_sizes: np.ndarray | None = None  # set by measure()
    spool: Spool | None = field(default=None, repr=False, compare=False)  # measure() -> write

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def measure(self, source: Readable, progress: Progress | None = None) -> int:
        """Make ``total_size`` exact for a compressed image, before writing (a sized upload).

        This is the writer's compression pass run ahead: its spool is kept on the layout and
        the next ``write`` emits it without compressing again (``release`` drops it if no write
        follows). No-op without compression."""
        if not self.compression or self.compressed_sizes is not None:
            return self.total_size
        w = Writer(self, source, None, progress)  # type: ignore[arg-type]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qcow2-deflate") as pool:
            spool = w.compress_pass(pool, progress)
        meta, _ = w.final_meta(spool.sizes)
        self.release()
        self.spool = spool
        self.compressed_sizes = spool.sizes
        self.total_size = meta.total * self.cluster_size
        return self.total_size

    def release(self) -> None:
        """Free the spool of a ``measure`` no ``write`` consumed (else freed when collected)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class Writer:
    """Emits one planned image; a fresh instance per ``write`` call."""

    def __init__(self, layout: Qcow2Layout, source: Readable, out: Sink, progress):
        self.lo = layout
        self.src = source
        self.out = out
        self.progress = progress
        self.cs = layout.cluster_size
        self.entries_per_l2 = self.cs // 8

    # -- data pieces -------------------------------------------------------------------------
    def _pieces(self) -> Iterator[Extent]:
        """Guest byte ranges of the data clusters, cut at IO_CHUNK, clipped to the disk."""
        cs, size = self.cs, self.lo.virtual_size
        for r in self.lo.runs:
            if r.kind != DATA:
                continue
            pos, end = r.first * cs, min(size, (r.first + r.count) * cs)
            while pos < end:
                stop = min(end, (pos // IO_CHUNK + 1) * IO_CHUNK)
                yield Extent(pos, stop - pos)
                pos = stop

    # -- metadata ----------------------------------------------------------------------------
    def _header(self, meta: Meta) -> bytes:
        lo, cs = self.lo, self.cs
        exts = b""
        if lo.backing_format:
            exts += L.pack_extension(L.EXT_BACKING_FORMAT, lo.backing_format.encode())
        exts += L.EXTENSION.pack(L.EXT_END, 0)
        hdr_len = L.V3_HEADER_LENGTH if lo.version >= 3 else L.V2_HEADER.size
        name = lo.backing_file.encode()
        h = L.Header(
            version=lo.version,
            backing_file_offset=hdr_len + len(exts) if name else 0,
            backing_file_size=len(name),
            cluster_bits=lo.cluster_bits,
            size=_ceil(lo.virtual_size, L.SECTOR) * L.SECTOR,  # qemu sees whole sectors only
            crypt_method=0,
            l1_size=lo.l1_size,
            l1_table_offset=meta.l1 * cs,
            refcount_table_offset=meta.rt * cs,
            refcount_table_clusters=meta.rt_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            refcount_order=REFCOUNT_ORDER,
            header_length=hdr_len,
        )
        return h.pack() + exts + name

    def _emit_array(self, arr: np.ndarray, clusters: int) -> None:
        raw = arr.astype(">u8").tobytes()
        self.out.write(raw)
        self.out.write_zeros(clusters * self.cs - len(raw))

    def _emit_metadata(self, meta: Meta, refcounts_data: np.ndarray | None, descs) -> None:
        lo, cs, out = self.lo, self.cs, self.out
        head = self._header(meta)
        if len(head) > cs:
            raise InvalidParameterError("qcow2 header and backing file name exceed one cluster")
        out.write(head)
        out.write_zeros(cs - len(head))
        # L1
        l1 = np.zeros(lo.l1_size, dtype=np.uint64)
        if len(lo.l2_indices):
            l2_offs = (meta.l2 + np.arange(len(lo.l2_indices), dtype=np.uint64)) * np.uint64(cs)
            l1[lo.l2_indices] = l2_offs | np.uint64(L.OFLAG_COPIED)
        self._emit_array(l1, meta.l1_clusters)
        # refcount table
        rt = (meta.rb + np.arange(meta.rb_count, dtype=np.uint64)) * np.uint64(cs)
        self._emit_array(rt, meta.rt_clusters)
        # refcount blocks: 1 for every metadata cluster, then the data region's counts
        per_block = cs * 8 >> REFCOUNT_ORDER
        for i in range(meta.rb_count):
            first = i * per_block
            block = np.zeros(per_block, dtype=">u2")
            n_meta = max(0, min(per_block, meta.data - first))
            block[:n_meta] = 1
            if refcounts_data is None:
                stop = max(0, min(per_block, meta.total - first))
                block[n_meta:stop] = 1
            else:
                d0 = max(0, first - meta.data)
                d1 = max(0, min(len(refcounts_data), first + per_block - meta.data))
                if d1 > d0:
                    at = max(first, meta.data) - first
                    block[at : at + d1 - d0] = refcounts_data[d0:d1]
            out.write(block.tobytes())
        # L2 tables
        self._emit_l2(meta, descs)

    def _emit_l2(self, meta: Meta, descs: Descriptors | None) -> None:
        E, cs = self.entries_per_l2, self.cs
        runs = self.lo.runs
        i = 0
        data_base = np.uint64(meta.data * cs)
        copied = np.uint64(L.OFLAG_COPIED)
        for j in self.lo.l2_indices.tolist():
            lo_c, hi_c = j * E, (j + 1) * E
            table = np.zeros(E, dtype=np.uint64)
            while i < len(runs) and runs[i].first + runs[i].count <= lo_c:
                i += 1
            k = i
            while k < len(runs) and runs[k].first < hi_c:
                r = runs[k]
                a, b = max(lo_c, r.first), min(hi_c, r.first + r.count)
                if r.kind == ZERO:
                    table[a - lo_c : b - lo_c] = L.OFLAG_ZERO
                else:
                    rank = r.rank + (a - r.first)
                    if descs is None:
                        idx = np.arange(rank, rank + b - a, dtype=np.uint64)
                        table[a - lo_c : b - lo_c] = (data_base + idx * np.uint64(cs)) | copied
                    else:
                        table[a - lo_c : b - lo_c] = descs(rank, b - a)
                k += 1
            self.out.write(table.astype(">u8").tobytes())

    # -- plain -------------------------------------------------------------------------------
    def write_plain(self) -> None:
        lo, cs = self.lo, self.cs
        meta = lo.meta
        assert meta is not None
        self._emit_metadata(meta, None, None)
        for piece, data in read_pieces(self.src, self._pieces()):
            self.out.write(data)
            if len(data) % cs:
                self.out.write_zeros(-len(data) % cs)
            if self.progress:
                self.progress(piece.length)
        lo.used_size = meta.total * cs

    # -- compressed --------------------------------------------------------------------------
    def _deflate_jobs(self, pool: ThreadPoolExecutor) -> Iterator[tuple[Extent, np.ndarray, bytes]]:
        """(piece, compressed size per cluster (0: stays raw), the blobs back to back), in order.

        Whole 4 MiB pieces are the work units (few futures), two compressing on the pool's
        threads at once (zlib releases the GIL) while the next piece is read ahead."""
        cs = self.cs
        dtype = size_dtype(cs)
        step = cs // 16

        def job(data: bytes) -> tuple[np.ndarray, bytes]:
            if len(data) % cs:  # the disk's last cluster, clipped: stored whole
                data = data + bytes(-len(data) % cs)
            view = memoryview(data)
            samples = data[::16]  # one copy for the piece; cluster i's sample is a slice of it
            count = len(data) // cs
            sizes = np.zeros(count, dtype=dtype)
            blobs = []
            for i in range(count):
                if not worth_deflating(samples[i * step : (i + 1) * step], L.DEFLATE_WBITS):
                    continue
                c = deflate(view[i * cs : (i + 1) * cs], COMPRESS_LEVEL, L.DEFLATE_WBITS)
                if len(c) < cs:
                    sizes[i] = len(c)
                    blobs.append(c)
            return sizes, b"".join(blobs)

        queue: deque = deque()
        for piece, data in read_ahead(self.src, self._pieces()):
            queue.append((piece, pool.submit(job, data)))
            if len(queue) > 2:
                head, fut = queue.popleft()
                yield head, *fut.result()
        while queue:
            head, fut = queue.popleft()
            yield head, *fut.result()

    def compress_pass(self, pool: ThreadPoolExecutor, progress: Progress | None = None) -> Spool:
        """Pass 1, the only one that compresses: every data cluster's compressed size, and the
        compressed blobs spooled to a temporary file for the emit pass."""
        n = self.lo.data_clusters
        spool = Spool(n, self.cs)
        try:
            k = 0
            for piece, sizes, blob in self._deflate_jobs(pool):
                if k + len(sizes) > n:
                    raise FormatError(None, f"source gave more data clusters than the {n} planned")
                spool.sizes[k : k + len(sizes)] = sizes
                spool.append(blob)
                k += len(sizes)
                if progress:
                    progress(piece.length)
            if k != n:
                raise FormatError(None, f"source gave {k} data clusters, planned {n}")
            spool.seal()
        except BaseException:
            spool.close()
            raise
        return spool

    def final_meta(self, sizes: np.ndarray) -> tuple[Meta, int]:
        """Placement once the compressed sizes are known, and the data region's clusters."""
        lo, cs = self.lo, self.cs
        data_clusters = _ceil(Packer(sizes, cs).end(), cs)
        assert lo.meta is not None
        return place(cs, lo.meta.l1_clusters, lo.meta.l2_count, data_clusters), data_clusters

    def write_compressed(self) -> None:
        lo, cs, out = self.lo, self.cs, self.out
        spool, lo.spool = lo.spool, None  # measured ahead: emit what measure() compressed
        try:
            emit_progress = self.progress if spool is not None else None
            if spool is None:
                with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qcow2-deflate") as pool:
                    spool = self.compress_pass(pool, self.progress)
                measured = lo.compressed_sizes
                if measured is not None and not np.array_equal(measured, spool.sizes):
                    raise FormatError(
                        None, "source changed since measure(): compressed sizes differ"
                    )
            sizes = spool.sizes
            meta, data_clusters = self.final_meta(sizes)
            self._emit_metadata(
                meta,
                self._data_refcounts(sizes, data_clusters),
                Descriptors(sizes, cs, meta.data * cs, lo.cluster_bits),
            )
            pos = self._emit_data(spool, emit_progress)
        finally:
            if spool is not None:
                spool.close()
        if _ceil(pos, cs) != data_clusters:
            raise FormatError(None, "qcow2 data region does not match its planned size")
        out.write_zeros(-pos % cs)
        used = (meta.data + data_clusters) * cs
        lo.used_size = used
        if used > lo.total_size:
            raise FormatError(None, "qcow2 output outgrew its planned size")
        out.write_zeros(lo.total_size - used)

    def _emit_data(self, spool: Spool, progress: Progress | None) -> int:
        """The emit pass: compressed runs from the spool, raw clusters read again from the
        source (cheap), fetched one thread ahead of the sink. Returns the data bytes emitted."""
        cs, out, sizes, src = self.cs, self.out, spool.sizes, self.src

        def fetch(piece: Extent, sz: np.ndarray, at: int) -> list[tuple[bool, bytes]]:
            raw = sz == 0
            if not raw.any():
                return [(False, spool.read(at, int(sz.sum())))]
            cuts = [0, *(np.flatnonzero(raw[1:] != raw[:-1]) + 1).tolist(), len(sz)]
            parts = []
            for a, b in zip(cuts, cuts[1:], strict=False):
                if raw[a]:
                    start = piece.offset + a * cs
                    length = min(piece.end, piece.offset + b * cs) - start
                    data = src.read(start, length)
                    if len(data) != length:
                        raise FormatError(None, "source returned a short read in the emit pass")
                    if length % cs:  # the disk's last cluster, clipped: stored whole
                        data = bytes(data) + bytes(-length % cs)
                    parts.append((True, data))
                else:
                    n = int(sz[a:b].sum())
                    parts.append((False, spool.read(at, n)))
                    at += n
            return parts

        pos = 0

        def emit(piece: Extent, fut) -> None:
            nonlocal pos
            for raw, data in fut.result():
                if raw:
                    pad = -pos % cs
                    out.write_zeros(pad)
                    pos += pad
                out.write(data)
                pos += len(data)
            if progress:
                progress(piece.length)

        queue: deque = deque()
        k = at = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcow2-emit") as pool:
            for piece in self._pieces():
                sz = sizes[k : k + _ceil(piece.length, cs)]
                queue.append((piece, pool.submit(fetch, piece, sz, at)))
                k += len(sz)
                at += int(sz.sum())
                if len(queue) > 2:
                    emit(*queue.popleft())
            while queue:
                emit(*queue.popleft())
        if k != len(sizes) or at != spool.length:
            raise FormatError(None, "qcow2 compressed data does not match the planned sizes")
        return pos

    def _data_refcounts(self, sizes: np.ndarray, data_clusters: int) -> np.ndarray:
        """References per host cluster of the data region (a compressed blob may span two)."""
        cs, n = self.cs, len(sizes)
        refc = np.zeros(data_clusters, dtype=np.uint32)
        packer = Packer(sizes, cs)
        while packer.rank < n:
            rel, sz = packer.take(min(PACK_CHUNK, n - packer.rank))
            first = (rel // np.uint64(cs)).astype(np.int64)
            sz64 = sz.astype(np.uint64)
            length = np.where(sz64 == 0, np.uint64(cs), sz64)
            last = ((rel + length - np.uint64(1)) // np.uint64(cs)).astype(np.int64)
            np.add.at(refc, first, 1)
            np.add.at(refc, last[last != first], 1)
        if data_clusters and int(refc.max()) > 0xFFFF:
            raise FormatError(None, "too many compressed clusters share one host cluster")
        return refc.astype(">u2")


def write(source: Readable, layout: Qcow2Layout, out: Sink, progress: Progress | None) -> None:
    """Emit ``layout`` (from ``_qcow2_plan.plan``) with the bytes of ``source``, in order."""
    w = Writer(layout, source, out, progress)
    if layout.compression:
        w.write_compressed()
    else:
        w.write_plain()
