"""QCOW2 (qemu's native format): streaming writer, reader with backing chains, consistency check.

Writer layout (decided in ``plan`` from the extent map alone, emitted strictly in order):

    cluster 0          header, header extensions (backing format), backing file name
    L1 table           ceil(l1_size * 8 / cluster) clusters
    refcount table     sized for every cluster of the file
    refcount blocks    one per (cluster_size * 8 / 16) host clusters (16-bit refcounts)
    L2 tables          one per L1 entry that covers an allocated or zero cluster, in L1 order
    data clusters      in guest order

Every host cluster of the file is referenced exactly once, so the refcount blocks are just "1 up
to the end of the file" and the L2 entries are arithmetic over the runs of allocated clusters:
nothing per cluster is kept in memory. A guest cluster touched by a data extent is stored whole
(read from the source); a cluster fully covered by a ``zero`` extent becomes a v3 zero cluster;
any other cluster stays unallocated, so with a backing file it reads through to the base. A
cluster only partly covered by a zero extent (and by no data) is stored as data when there is a
backing file: the source holds the right bytes for all of it.

Compression (``compression=zlib``) makes host offsets depend on compressed sizes that ``plan``
cannot know (it never sees the data), while the header, L1 and L2 tables must come first because
we never seek. So ``write`` makes two passes, compressing once: pass 1 deflates every data cluster
(4 MiB pieces, two in flight on two threads: zlib releases the GIL), keeps its compressed size (2
bytes per cluster, 4 above 64 KiB clusters) and spools the compressed bytes to an unlinked
temporary file (TMPDIR; disk use = compressed size, memory stays a few chunks). Then the tables
are built and emitted (offsets, descriptors and refcounts are recomputed from the sizes, in
vectorised chunks), and the emit pass streams the spool, reading the clusters stored
uncompressed again from the source (cheap, and never spooled). Compressed clusters are packed
back to back at byte granularity, as qemu does; a cluster that does not shrink is stored
uncompressed at the next cluster boundary, and so is one whose 1-in-16 byte sample does not
deflate at level 1 (random or encrypted data: this skips most of the cost). ``plan`` can only
give an upper bound for a compressed image (every cluster uncompressed), so ``write`` pads the
end of the file with zeros up to ``total_size``: the padding lies beyond every referenced
cluster (qemu-img check stays clean) and becomes a hole on a local file; ``Qcow2Layout.used_size``
tells the meaningful length after write. Where the exact length matters before writing (a sized
upload), ``Qcow2Layout.measure(source)`` runs pass 1 ahead and makes ``total_size`` exact;
``write`` then emits its spool (a second write compresses again and refuses a source whose
compressed sizes changed).

The reader handles v2 and v3, 512 B..2 MiB clusters, zero, unallocated and compressed clusters
and backing chains (depth 16, loops refused), and refuses what it cannot read faithfully:
encryption, external data files, extended L2 entries, zstd, dirty or corrupt images.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hypersdk.errors import (
    FormatError,
    InvalidParameterError,
    TargetError,
    TargetFullError,
    UnsupportedFormatError,
)
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats._deflate import deflate, worth_deflating
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import IO_CHUNK, RangeReader, Sink, disk_full, read_ahead, read_pieces

DEFAULT_CLUSTER = 64 * 1024
REFCOUNT_ORDER = 4  # 16-bit refcounts, what qemu writes
MAX_CHAIN = 16
COMPRESS_LEVEL = 6  # zlib's default, what qemu uses

_DATA, _ZERO, _UNALLOC, _STD, _COMP = 1, 2, 3, 4, 5
_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcow2_chain", default=())


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------- writer
@dataclass
class _Run:
    first: int  # guest cluster
    count: int
    kind: int  # _DATA or _ZERO
    rank: int = 0  # index of the first cluster among all data clusters


@dataclass
class _Meta:
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


def _place(cs: int, l1_clusters: int, l2_count: int, data_clusters: int) -> _Meta:
    """Find refcount table/block counts that cover the file including themselves."""
    per_block = cs * 8 >> REFCOUNT_ORDER
    rt, rb = 1, 0
    while True:
        total = 1 + l1_clusters + rt + rb + l2_count + data_clusters
        rb2 = _ceil(total, per_block)
        rt2 = max(1, _ceil(rb2 * 8, cs))
        if rb2 <= rb and rt2 <= rt:
            return _Meta(l1_clusters, rt, rb, l2_count, data_clusters)
        rb, rt = max(rb, rb2), max(rt, rt2)


@dataclass
class Qcow2Layout(Layout):
    cluster_bits: int = 16
    version: int = 3
    backing_file: str = ""
    backing_format: str = ""
    compression: bool = False
    runs: list[_Run] = field(default_factory=list)
    l2_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    l1_size: int = 0
    data_clusters: int = 0
    meta: _Meta | None = None
    used_size: int = 0  # bytes that matter (set by write; < total_size only when compressed)
    compressed_sizes: np.ndarray | None = None  # set by measure()
    spool: _Spool | None = field(default=None, repr=False, compare=False)  # measure() -> write

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
        w = _Writer(self, source, None, progress)  # type: ignore[arg-type]
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


def _parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1024 ** ("KMG".index(t[-1]) + 1)
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise InvalidParameterError(f"qcow2 cluster_size {text!r} is not a size") from None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _cluster_runs(extents: ExtentMap, cs: int, size: int, v3: bool, backing: bool) -> list[_Run]:
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    for e in extents:
        a, b = e.offset // cs, _ceil(e.end, cs)
        if not e.zero:
            data.append((a, b))
            continue
        fa = _ceil(e.offset, cs)
        fb = b if e.end == size else e.end // cs
        if v3 and fa < fb:
            zero.append((fa, fb))
        if backing:  # partly zeroed clusters: the source has the right bytes for all of them
            if fa >= fb:
                data.append((a, b))
            else:
                if a < fa:
                    data.append((a, fa))
                if fb < b:
                    data.append((fb, b))
    runs = [_Run(a, b - a, _DATA) for a, b in _merge(data)]
    runs += [_Run(a, b - a, _ZERO) for a, b in _merge(zero)]
    runs.sort(key=lambda r: r.first)
    rank = 0
    for r in runs:
        r.rank = rank
        if r.kind == _DATA:
            rank += r.count
    return runs


class _Writer:
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
            if r.kind != _DATA:
                continue
            pos, end = r.first * cs, min(size, (r.first + r.count) * cs)
            while pos < end:
                stop = min(end, (pos // IO_CHUNK + 1) * IO_CHUNK)
                yield Extent(pos, stop - pos)
                pos = stop

    def _clusters(self, piece: Extent, data: bytes) -> list[bytes]:
        cs = self.cs
        if len(data) % cs:
            data = data + bytes(-len(data) % cs)
        return [data[i : i + cs] for i in range(0, len(data), cs)]

    # -- metadata ----------------------------------------------------------------------------
    def _header(self, meta: _Meta) -> bytes:
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

    def _emit_metadata(self, meta: _Meta, refcounts_data: np.ndarray | None, descs) -> None:
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

    def _emit_l2(self, meta: _Meta, descs: _Descriptors | None) -> None:
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
                if r.kind == _ZERO:
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
        dtype = _size_dtype(cs)
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

    def compress_pass(self, pool: ThreadPoolExecutor, progress: Progress | None = None) -> _Spool:
        """Pass 1, the only one that compresses: every data cluster's compressed size, and the
        compressed blobs spooled to a temporary file for the emit pass."""
        n = self.lo.data_clusters
        spool = _Spool(n, self.cs)
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

    def final_meta(self, sizes: np.ndarray) -> tuple[_Meta, int]:
        """Placement once the compressed sizes are known, and the data region's clusters."""
        lo, cs = self.lo, self.cs
        data_clusters = _ceil(_Packer(sizes, cs).end(), cs)
        assert lo.meta is not None
        return _place(cs, lo.meta.l1_clusters, lo.meta.l2_count, data_clusters), data_clusters

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
                _Descriptors(sizes, cs, meta.data * cs, lo.cluster_bits),
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

    def _emit_data(self, spool: _Spool, progress: Progress | None) -> int:
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
        packer = _Packer(sizes, cs)
        while packer.rank < n:
            rel, sz = packer.take(min(_PACK_CHUNK, n - packer.rank))
            first = (rel // np.uint64(cs)).astype(np.int64)
            sz64 = sz.astype(np.uint64)
            length = np.where(sz64 == 0, np.uint64(cs), sz64)
            last = ((rel + length - np.uint64(1)) // np.uint64(cs)).astype(np.int64)
            np.add.at(refc, first, 1)
            np.add.at(refc, last[last != first], 1)
        if data_clusters and int(refc.max()) > 0xFFFF:
            raise FormatError(None, "too many compressed clusters share one host cluster")
        return refc.astype(">u2")


_PACK_CHUNK = 1 << 18  # clusters per vectorised packing step (a few MiB of temporaries)


def _size_dtype(cs: int) -> type:
    return np.uint16 if cs <= 65536 else np.uint32  # a compressed size is < cs


class _Spool:
    """Pass 1's output: each data cluster's compressed size (0: stored raw, read again from the
    source when emitted) and the compressed blobs back to back in an unlinked temporary file
    (TMPDIR; disk use = the compressed size). Nothing is left behind: the file has no name, and
    its space is freed on close, or when the process dies."""

    def __init__(self, count: int, cs: int):
        self.sizes = np.zeros(count, dtype=_size_dtype(cs))
        self.length = 0
        try:
            # closed by close(), on every path of compress_pass and write_compressed
            self.file = tempfile.TemporaryFile(prefix="hypersdk-qcow2-")  # noqa: SIM115
        except OSError as exc:
            raise _spool_error(exc) from None

    def append(self, blob: bytes) -> None:
        try:
            self.file.write(blob)
        except OSError as exc:
            raise _spool_error(exc) from None
        self.length += len(blob)

    def seal(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise _spool_error(exc) from None

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.file.fileno(), length, offset)
        if len(data) != length:
            raise FormatError(None, "qcow2 compression spool was truncated")
        return data

    def close(self) -> None:
        self.file.close()


def _spool_error(exc: OSError) -> TargetError:
    where = tempfile.gettempdir()
    cls = TargetFullError if disk_full(exc) else TargetError
    return cls(
        f"qcow2 compression needs temporary space for the compressed clusters in {where} "
        f"(set TMPDIR elsewhere): {exc.strerror or exc}"
    )


def _pack(sz: np.ndarray, pos: int, cs: int) -> tuple[np.ndarray, int]:
    """Relative host offsets of clusters with compressed sizes ``sz`` (0: raw), packed from byte
    ``pos``: blobs back to back, a raw cluster at the next cluster boundary. Vectorised: after a
    raw cluster the position is aligned again, so each stretch of blobs between raw clusters is a
    cumulative sum from that aligned point. Returns (offsets, position after the last)."""
    n = len(sz)
    s = sz.astype(np.int64)
    before = np.zeros(n + 1, dtype=np.int64)  # blob bytes before cluster i (of this chunk)
    np.cumsum(s, out=before[1:])
    raws = np.flatnonzero(s == 0)
    if not len(raws):
        return (pos + before[:n]).astype(np.uint64), pos + int(before[n])
    base = pos // cs * cs
    stretch = np.diff(before[raws], prepend=0)  # blob bytes since the previous raw cluster
    stretch[0] += pos - base
    after = base + np.cumsum(-(-stretch // cs) * cs + cs)  # aligned end of each raw cluster
    prev = np.searchsorted(raws, np.arange(n)) - 1  # the raw cluster before each cluster
    has = prev >= 0
    rel = np.where(has, after[prev] + before[:n] - before[raws[prev]], pos + before[:n])
    rel[raws] = after - cs
    return rel.astype(np.uint64), int(after[-1] + before[n] - before[raws[-1]])


class _Packer:
    """Relative host offsets of compressed-mode data clusters, handed out in order (any count
    per call) from chunks packed ahead by ``_pack``."""

    def __init__(self, sizes: np.ndarray, cs: int):
        self.sizes, self.cs = sizes, cs
        self.rank = 0  # next cluster handed out
        self._buf = np.zeros(0, dtype=np.uint64)
        self._at = 0  # rank of _buf[0]
        self._end = 0  # position after the packed chunks

    def _fill(self) -> None:
        self._at += len(self._buf)
        sz = self.sizes[self._at : self._at + _PACK_CHUNK]
        self._buf, self._end = _pack(sz, self._end, self.cs)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.rank
        count = min(count, len(self.sizes) - start)
        parts = []
        while self.rank < start + count:
            i = self.rank - self._at
            if i >= len(self._buf):
                self._fill()
                continue
            got = self._buf[i : i + start + count - self.rank]
            parts.append(got)
            self.rank += len(got)
        rel = parts[0] if len(parts) == 1 else np.concatenate(parts or [self._buf[:0]])
        return rel, self.sizes[start : self.rank]

    def end(self) -> int:
        """Position after the last cluster."""
        while self._at + len(self._buf) < len(self.sizes):
            self._fill()
        return self._end


class _Descriptors:
    """L2 entries of the data clusters, handed out in rank order (as the L2 tables need them)."""

    def __init__(self, sizes: np.ndarray, cs: int, base: int, cluster_bits: int):
        self.packer = _Packer(sizes, cs)
        self.base = np.uint64(base)
        self.x = np.uint64(L.compressed_fields(cluster_bits)[0])

    def __call__(self, rank: int, count: int) -> np.ndarray:
        assert rank == self.packer.rank, "descriptors must be taken in order"
        rel, sz = self.packer.take(count)
        off = rel + self.base
        sz64 = sz.astype(np.uint64)
        sect = ((off + sz64 - np.uint64(1)) >> np.uint64(9)) - (off >> np.uint64(9))
        return np.where(
            sz == 0,
            off | np.uint64(L.OFLAG_COPIED),
            np.uint64(L.OFLAG_COMPRESSED) | (sect << self.x) | off,
        ).astype(np.uint64)


# ------------------------------------------------------------------------------------- reader
class Qcow2Image(DiskImage):
    format = "qcow2"

    def __init__(self, reader: RangeReader):
        super().__init__(reader, 0)
        self.backing: DiskImage | None = None
        self._l2_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # readers may be shared by read-ahead threads
        self._pool: ThreadPoolExecutor | None = None
        try:
            self._open()
        except FormatError:
            self._close_backing()
            raise
        except (ValueError, OverflowError, zlib.error) as exc:
            self._close_backing()
            raise FormatError(self.name, f"malformed QCOW2 image: {exc}") from None

    # -- opening -----------------------------------------------------------------------------
    def _bad(self, problem: str) -> FormatError:
        return FormatError(self.name, problem)

    def _open(self) -> None:
        fsize = self.reader.size
        if fsize < L.V2_HEADER.size:
            raise self._bad("truncated: too short for a QCOW2 header")
        head = self.reader.read(0, min(fsize, 4096))
        if head[:4] != L.MAGIC:
            raise self._bad("not a QCOW2 image (bad magic)")
        version = int.from_bytes(head[4:8], "big")
        if version not in (2, 3):
            raise self._bad(f"unsupported QCOW2 version {version} (only 2 and 3)")
        if version == 3 and len(head) < 104:
            raise self._bad("truncated: too short for a QCOW2 v3 header")
        h = L.Header.unpack(head)
        self.header = h
        if not L.MIN_CLUSTER_BITS <= h.cluster_bits <= L.MAX_CLUSTER_BITS:
            raise self._bad(f"invalid cluster_bits {h.cluster_bits} (9..21)")
        cs = self.cluster_size = 1 << h.cluster_bits
        self.cluster_bits = h.cluster_bits
        self.version = version
        if h.crypt_method != 0:
            raise UnsupportedQcow2(self.name, "is encrypted: decrypt it first (qemu-img convert)")
        inc = h.incompatible_features
        if inc & L.INCOMPAT_DIRTY:
            raise self._bad("image is dirty: run qemu-img check -r all")
        if inc & L.INCOMPAT_CORRUPT:
            raise self._bad("image is marked corrupt: run qemu-img check -r all")
        if inc & L.INCOMPAT_DATA_FILE:
            raise UnsupportedQcow2(self.name, "uses an external data file: not supported")
        if inc & L.INCOMPAT_EXTL2:
            raise UnsupportedQcow2(
                self.name, "uses extended L2 entries (subclusters): not supported"
            )
        if inc & ~L.INCOMPAT_KNOWN:
            raise UnsupportedQcow2(
                self.name, f"uses unknown incompatible features {inc & ~L.INCOMPAT_KNOWN:#x}"
            )
        if inc & L.INCOMPAT_COMPRESSION and h.compression_type != 0:
            raise UnsupportedQcow2(
                self.name, f"uses compression type {h.compression_type} (only zlib is supported)"
            )
        if version == 3:
            if h.header_length < 104 or h.header_length > cs:
                raise self._bad(f"invalid header_length {h.header_length}")
            if h.refcount_order > 6:
                raise self._bad(f"invalid refcount_order {h.refcount_order}")
        else:
            h.refcount_order, h.header_length = 4, L.V2_HEADER.size
        if h.size > 1 << 60:
            raise self._bad(f"absurd virtual size {h.size}")
        self.virtual_size = h.size
        self.entries_per_l2 = cs // 8
        needed_l1 = _ceil(_ceil(h.size, cs), self.entries_per_l2)
        if h.l1_size < needed_l1:
            raise self._bad(f"L1 table too small ({h.l1_size} entries, need {needed_l1})")
        if h.l1_size * 8 > L.MAX_L1_BYTES:
            raise self._bad(f"L1 table absurdly large ({h.l1_size} entries)")
        self._check_table("L1 table", h.l1_table_offset, h.l1_size * 8, fsize)
        rt_bytes = h.refcount_table_clusters * cs
        if rt_bytes > L.MAX_REFTABLE_BYTES:
            raise self._bad(f"refcount table absurdly large ({h.refcount_table_clusters} clusters)")
        self._check_table("refcount table", h.refcount_table_offset, rt_bytes, fsize)
        raw_l1 = self.reader.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self.l1 = np.frombuffer(raw_l1, dtype=">u8").astype(np.uint64)
        self._l1_used = np.flatnonzero(self.l1 & np.uint64(L.OFFSET_MASK))
        cluster0 = self.reader.read(0, min(cs, fsize))
        self._read_extensions(cluster0)
        self.backing_file = ""
        if h.backing_file_offset:
            end = h.backing_file_offset + h.backing_file_size
            if h.backing_file_size > L.MAX_BACKING_NAME or end > min(cs, fsize):
                raise self._bad("backing file name lies outside the header cluster")
            try:
                self.backing_file = cluster0[h.backing_file_offset : end].decode()
            except UnicodeDecodeError:
                raise self._bad("backing file name is not valid UTF-8") from None
        if self.backing_file:
            self._open_backing()

    def _check_table(self, what: str, offset: int, length: int, fsize: int) -> None:
        if length == 0:
            return
        if offset % self.cluster_size:
            raise self._bad(f"{what} offset {offset:#x} is not cluster aligned")
        if offset == 0:
            raise self._bad(f"{what} overlaps the header")
        if offset + length > fsize:
            raise self._bad(f"{what} at {offset:#x}+{length} lies beyond the end of the file")

    def _read_extensions(self, cluster0: bytes) -> None:
        self.backing_format = ""
        self.extensions: set[int] = set()
        pos = self.header.header_length
        for _ in range(1024):
            if pos + 8 > len(cluster0):
                break
            kind, length = L.EXTENSION.unpack_from(cluster0, pos)
            if kind == L.EXT_END:
                break
            data = cluster0[pos + 8 : pos + 8 + length]
            if len(data) < length:
                raise self._bad("header extension runs past the header cluster")
            self.extensions.add(kind)
            if kind == L.EXT_BACKING_FORMAT:
                self.backing_format = data.decode(errors="replace")
            pos += 8 + length + (-length % 8)

    def _open_backing(self) -> None:
        from hypersdk.formats import drivers, open_image

        name = self.backing_file
        if name.startswith("json:") or "://" in name:
            raise UnsupportedQcow2(self.name, f"backing file {name!r} is not a local file")
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.name), name)
        if not os.path.exists(path):
            raise self._bad(f"backing file {path} not found")
        me = os.path.realpath(self.name)
        chain = _CHAIN.get()
        if me in chain or os.path.realpath(path) in chain + (me,):
            raise self._bad(f"backing chain loops back to {path}")
        if len(chain) + 1 >= MAX_CHAIN:
            raise self._bad(f"backing chain deeper than {MAX_CHAIN}")
        fmt = self.backing_format if self.backing_format in drivers() else None
        token = _CHAIN.set(chain + (me,))
        try:
            self.backing = open_image(path, fmt)
        except FormatError as exc:
            raise self._bad(f"backing file: {exc}") from None
        finally:
            _CHAIN.reset(token)

    # -- table walking -----------------------------------------------------------------------
    def _l2(self, index: int) -> np.ndarray | None:
        """L2 table for L1 entry ``index`` (None: unallocated)."""
        if index >= len(self.l1):
            return None
        off = int(self.l1[index]) & L.OFFSET_MASK
        if off == 0:
            return None
        with self._lock:
            table = self._l2_cache.get(off)
            if table is not None:
                self._l2_cache.move_to_end(off)
                return table
        cs = self.cluster_size
        if off % cs:
            raise self._bad(f"L2 table offset {off:#x} is not cluster aligned")
        if off + cs > self.reader.size:
            raise self._bad(f"L2 table at {off:#x} lies beyond the end of the file (truncated?)")
        table = np.frombuffer(self.reader.read(off, cs), dtype=">u8").astype(np.uint64)
        with self._lock:
            self._l2_cache[off] = table
            if len(self._l2_cache) > max(4, (16 << 20) // cs):
                self._l2_cache.popitem(last=False)
        return table

    def _segments(self, first: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(kind, first guest cluster, count, entry of the first) over guest clusters
        [first, end); _STD runs are host-contiguous, _COMP runs are single clusters."""
        E, cs = self.entries_per_l2, self.cluster_size
        c = first
        while c < end:
            j = c // E
            stop = min(end, (j + 1) * E)
            table = self._l2(j)
            if table is None:  # skip the whole run of empty L1 entries at once
                k = int(np.searchsorted(self._l1_used, j))
                nxt = int(self._l1_used[k]) if k < len(self._l1_used) else len(self.l1)
                stop = min(end, max(nxt, j + 1) * E)
                yield _UNALLOC, c, stop - c, 0
                c = stop
                continue
            ent = table[c - j * E : stop - j * E]
            comp = (ent & np.uint64(L.OFLAG_COMPRESSED)) != 0
            off = ent & np.uint64(L.OFFSET_MASK)
            zflag = (ent & np.uint64(L.OFLAG_ZERO)) != 0
            if self.version < 3 and bool((zflag & ~comp).any()):
                raise self._bad("zero-flagged cluster in a version 2 image")
            kinds = np.full(len(ent), _STD, dtype=np.int8)
            kinds[(off == 0) & ~comp] = _UNALLOC
            kinds[zflag & ~comp] = _ZERO
            kinds[comp] = _COMP
            std = kinds == _STD
            if bool((off[std] % np.uint64(cs)).any()):
                raise self._bad("data cluster offset is not cluster aligned")
            brk = np.ones(len(ent), dtype=bool)
            if len(ent) > 1:
                same = kinds[1:] == kinds[:-1]
                contig = (off[1:] == off[:-1] + np.uint64(cs)) | (kinds[1:] != _STD)
                brk[1:] = ~(same & contig) | (kinds[1:] == _COMP)
            starts = np.flatnonzero(brk)
            stops = np.append(starts[1:], len(ent))
            for s, t in zip(starts.tolist(), stops.tolist(), strict=True):
                yield int(kinds[s]), c + s, t - s, int(ent[s])
            c = stop

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed cluster descriptor."""
        x, mask = L.compressed_fields(self.cluster_bits)
        off = entry & ((1 << x) - 1)
        nsect = ((entry >> x) & mask) + 1
        csize = nsect * L.SECTOR - (off & (L.SECTOR - 1))
        fsize = self.reader.size
        if off >= fsize:
            raise self._bad(f"compressed cluster at {off:#x} lies beyond the end of the file")
        return off, min(csize, fsize - off)

    def _inflate(self, off: int, data: bytes) -> bytes:
        try:
            out = zlib.decompressobj(L.INFLATE_WBITS).decompress(data, self.cluster_size)
        except zlib.error as exc:
            raise self._bad(f"compressed cluster at {off:#x} is corrupt: {exc}") from None
        if len(out) != self.cluster_size:
            raise self._bad(f"compressed cluster at {off:#x} is truncated or corrupt")
        return out

    def _read_compressed_many(self, entries: list[int]) -> list[bytes]:
        """Fetch in the caller's thread (readers need not be thread-safe), inflate on 2 cores."""
        spans = [self._compressed_span(e) for e in entries]
        blobs: list[bytes] = []
        i = 0
        while i < len(spans):  # packed neighbours: one read for the group
            j, lo, hi = i + 1, spans[i][0], spans[i][0] + spans[i][1]
            while (
                j < len(spans)
                and lo <= spans[j][0] < hi + L.SECTOR
                and hi - lo < IO_CHUNK
                and j - i < 256
            ):
                hi = max(hi, spans[j][0] + spans[j][1])
                j += 1
            buf = self.reader.read(lo, hi - lo)
            blobs += [buf[o - lo : o - lo + n] for o, n in spans[i:j]]
            i = j
        offs = [o for o, _ in spans]
        if len(blobs) < 4:
            return [self._inflate(o, b) for o, b in zip(offs, blobs, strict=True)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qcow2-inflate")
        return list(self._pool.map(self._inflate, offs, blobs))

    def _read_backing(self, offset: int, length: int) -> bytes:
        if self.backing is None:
            return bytes(length)
        bsize = self.backing.virtual_size
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = self.backing.read(offset, n)
        return data if n == length else data + bytes(length - n)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        if length == 0:
            return b""
        cs, fsize = self.cluster_size, self.reader.size
        end = offset + length
        parts: list[bytes] = []
        comp: list[tuple[int, int, int, int]] = []  # (part index, entry, slice start, stop)
        for kind, c, count, entry in self._segments(offset // cs, _ceil(end, cs)):
            a, b = max(offset, c * cs), min(end, (c + count) * cs)
            if kind == _STD:
                host = (entry & L.OFFSET_MASK) + (a - c * cs)
                if (entry & L.OFFSET_MASK) + (count - 1) * cs >= fsize:
                    raise self._bad(
                        f"cluster for guest offset {a} lies beyond the end of the file (truncated?)"
                    )
                parts.append(self.reader.read(host, b - a))
            elif kind == _COMP:
                comp.append((len(parts), entry, a - c * cs, b - c * cs))
                parts.append(b"")
            elif kind == _ZERO:
                parts.append(bytes(b - a))
            else:
                parts.append(self._read_backing(a, b - a))
        if comp:
            clusters = self._read_compressed_many([e for _, e, _, _ in comp])
            for (k, _, lo, hi), data in zip(comp, clusters, strict=True):
                parts[k] = data[lo:hi]
        return b"".join(parts)

    def _walk(self) -> Iterator[tuple[int, int, int, int]]:
        return self._segments(0, _ceil(self.virtual_size, self.cluster_size))

    def extents(self) -> ExtentMap:
        cs, size = self.cluster_size, self.virtual_size
        out = ExtentCollector(size)
        base = self.backing.extents().data() if self.backing is not None else iter(())
        shown = next(base, None)  # the backing's next data extent, where it shows through
        for kind, c, count, _ in self._walk():  # in guest order
            a, b = c * cs, min(size, (c + count) * cs)
            if kind in (_STD, _COMP):
                out.add(a, b - a)
            elif kind == _UNALLOC:
                while shown is not None and shown.end <= a:
                    shown = next(base, None)
                while shown is not None and shown.offset < b:
                    start = max(a, shown.offset)
                    out.add(start, min(b, shown.end) - start)
                    if shown.end > b:
                        break
                    shown = next(base, None)
        return out.build()

    def info(self) -> dict:
        h = self.header
        out = {
            "compat": "1.1" if self.version >= 3 else "0.10",
            "cluster_size": self.cluster_size,
            "refcount_bits": 1 << h.refcount_order,
            "backing_file": self.backing_file or None,
            "backing_format": self.backing_format or None,
            "snapshots": h.nb_snapshots,
        }
        if len(self._l1_used) * self.cluster_size <= 64 << 20:  # cheap: <= 64 MiB of L2 tables
            with contextlib.suppress(FormatError):
                out["compressed_clusters"] = sum(
                    count for kind, _, count, _ in self._walk() if kind == _COMP
                )
        return out

    def check(self) -> list[str]:
        problems: list[str] = []
        try:
            _Checker(self, problems).run()
        except FormatError as exc:
            problems.append(exc.problem)
        return problems

    def _close_backing(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def close(self) -> None:
        self._close_backing()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        super().close()


class UnsupportedQcow2(UnsupportedFormatError):
    """A QCOW2 feature we refuse (encryption, external data file, subclusters...)."""


class _Checker:
    """Recount every cluster reference and compare with the stored refcounts."""

    MAX_CLUSTERS = 1 << 24

    def __init__(self, image: Qcow2Image, problems: list[str]):
        self.img = image
        self.problems = problems

    def run(self) -> None:
        img, h, cs = self.img, self.img.header, self.img.cluster_size
        fsize = img.reader.size
        n = _ceil(fsize, cs)
        do_refs = (
            n <= self.MAX_CLUSTERS and h.nb_snapshots == 0 and L.EXT_BITMAPS not in img.extensions
        )
        counts = np.zeros(n + 1, dtype=np.int64)  # last slot: references beyond EOF

        def ref(off: int, length: int, what: str) -> None:
            if off + length > fsize:
                self.problems.append(f"{what} at {off:#x} points beyond the end of the file")
            a, b = off // cs, (off + max(length, 1) - 1) // cs
            counts[min(a, n) : min(b, n - 1) + 1] += 1

        ref(0, cs, "header")
        if h.l1_size:
            ref(h.l1_table_offset, h.l1_size * 8, "L1 table")
        ref(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        reft = np.frombuffer(
            img.reader.read(h.refcount_table_offset, h.refcount_table_clusters * cs), dtype=">u8"
        ).astype(np.uint64)
        blocks = [int(e) & L.REFT_OFFSET_MASK for e in reft.tolist()]
        for b in blocks:
            if b:
                ref(b, cs, "refcount block")
        x, mask = L.compressed_fields(img.cluster_bits)
        for j, e in enumerate(img.l1.tolist()):
            off = e & L.OFFSET_MASK
            if not off:
                continue
            if off % cs or off + cs > fsize:
                self.problems.append(f"L1 entry {j} points to an invalid L2 table at {off:#x}")
                continue
            ref(off, cs, "L2 table")
            table = img._l2(j)
            assert table is not None
            for i, ent in enumerate(table.tolist()):
                if ent & L.OFLAG_COMPRESSED:
                    coff = ent & ((1 << x) - 1)
                    nsect = ((ent >> x) & mask) + 1
                    ref(coff, nsect * L.SECTOR - (coff & 511), f"compressed cluster (L2 {j}/{i})")
                elif ent & L.OFFSET_MASK:
                    hoff = ent & L.OFFSET_MASK
                    if hoff % cs:
                        self.problems.append(f"L2 entry {j}/{i} is not cluster aligned")
                    else:
                        ref(hoff, cs, f"data cluster (L2 {j}/{i})")
        if not do_refs:
            return
        stored = self._stored_refcounts(blocks, n)
        if stored is None:
            return
        bad = np.flatnonzero(stored != counts[:n])
        for c in bad[:10].tolist():
            self.problems.append(
                f"refcount mismatch for cluster {c}: stored {int(stored[c])}, "
                f"referenced {int(counts[c])}"
            )
        if len(bad) > 10:
            self.problems.append(f"... {len(bad) - 10} more refcount mismatches")

    def _stored_refcounts(self, blocks: list[int], n: int) -> np.ndarray | None:
        img, cs = self.img, self.img.cluster_size
        order = img.header.refcount_order
        if order < 3:
            return None  # sub-byte refcounts: not verified
        dtype = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]
        per_block = cs * 8 >> order
        out = np.zeros(n, dtype=np.int64)
        for i, b in enumerate(blocks):
            first = i * per_block
            if not b or first >= n:
                continue
            if b % cs or b + cs > img.reader.size:
                self.problems.append(f"refcount block {i} at {b:#x} is invalid")
                continue
            vals = np.frombuffer(img.reader.read(b, cs), dtype=dtype).astype(np.int64)
            take = min(per_block, n - first)
            out[first : first + take] = vals[:take]
        return out


# ------------------------------------------------------------------------------------- driver
class Qcow2Driver(FormatDriver):
    name = "qcow2"
    extensions = (".qcow2",)
    supports_backing = True
    option_names = ("cluster_size", "backing_file", "backing_format", "compat", "compression")
    probe_priority = 10

    def probe(self, head: bytes, size: int) -> bool:
        return head[:4] == L.MAGIC

    def open(self, reader: RangeReader) -> DiskImage:
        return Qcow2Image(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        opts = self.check_options(options)
        cs = _parse_size(opts.get("cluster_size", str(DEFAULT_CLUSTER)))
        if cs < 4096 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
            raise InvalidParameterError(
                f"qcow2 cluster_size {cs} must be a power of two from 4 KiB to 2 MiB"
            )
        compat = opts.get("compat", "1.1").strip().lower()
        if compat in ("1.1", "v3", "3"):
            version = 3
        elif compat in ("0.10", "v2", "2"):
            version = 2
        else:
            raise InvalidParameterError(f"qcow2 compat {compat!r}: use 1.1 or 0.10")
        compression = opts.get("compression", "").strip().lower()
        if compression not in ("", "none", "zlib"):
            raise InvalidParameterError(f"qcow2 compression {compression!r}: only zlib")
        backing = opts.get("backing_file", "")
        backing_fmt = opts.get("backing_format", "")
        if len(backing.encode()) > L.MAX_BACKING_NAME:
            raise InvalidParameterError("qcow2 backing_file name is longer than 1023 bytes")
        if backing_fmt and not backing:
            raise InvalidParameterError("qcow2 backing_format needs a backing_file")
        if extents.size != size:
            raise InvalidParameterError(f"extent map covers {extents.size} bytes, disk {size}")
        if version == 2 and backing and extents.has_zero_extents:
            raise FormatError(
                None,
                "qcow2 compat 0.10 (v2) cannot store zero clusters, which this delta needs: "
                "use compat=1.1",
            )
        bits = cs.bit_length() - 1
        E = cs // 8
        vclusters = _ceil(size, cs)
        l1_size = _ceil(vclusters, E)
        if l1_size * 8 > L.MAX_L1_BYTES:
            raise InvalidParameterError(
                f"disk of {size} bytes is too large for qcow2 with {cs}-byte clusters"
            )
        runs = _cluster_runs(extents, cs, size, version >= 3, bool(backing))
        if runs:
            idx = np.concatenate(
                [np.arange(r.first // E, (r.first + r.count - 1) // E + 1) for r in runs]
            )
            l2_indices = np.unique(idx).astype(np.int64)
        else:
            l2_indices = np.zeros(0, dtype=np.int64)
        data_clusters = sum(r.count for r in runs if r.kind == _DATA)
        meta = _place(cs, _ceil(l1_size * 8, cs), len(l2_indices), data_clusters)
        return Qcow2Layout(
            virtual_size=size,
            extents=extents,
            total_size=meta.total * cs,
            options=opts,
            cluster_bits=bits,
            version=version,
            backing_file=backing,
            backing_format=backing_fmt,
            compression=compression == "zlib",
            runs=runs,
            l2_indices=l2_indices,
            l1_size=l1_size,
            data_clusters=data_clusters,
            meta=meta,
        )

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        if not isinstance(layout, Qcow2Layout):
            raise InvalidParameterError("qcow2 write needs a layout from qcow2 plan")
        w = _Writer(layout, source, out, progress)
        if layout.compression:
            w.write_compressed()
        else:
            w.write_plain()


DRIVER = Qcow2Driver()
