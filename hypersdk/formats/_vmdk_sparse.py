"""One hosted sparse VMDK extent (KDMV header): monolithicSparse, streamOptimized, or one part of a
twoGbMaxExtentSparse disk. Grain directory and tables are read lazily (every table at open when
they are small), compressed grains inflate on two threads.

Headers are hostile, so the work is bounded by the real file size: the grain directory and every
table must lie inside the file, no two directory entries may name one grain table, and a walk
over every table stops as soon as it meets more allocated grains than the file can hold (a small
file must not pose as terabytes of data by pointing every entry at one grain).

In a delta disk (a child with a parent, ``_vmdk_parent``) an unallocated grain (table entry 0, or
no table at all) reads through ``parent_read``; a zero grain (entry 1) reads as zeros and hides
the parent, as qemu reads them.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hypersdk.errors import FormatError, HyperSDKError, UnsupportedFormatError
from hypersdk.extents import Extent
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._vmdk_descriptor import Descriptor, decode_descriptor
from hypersdk.formats._vmdk_layout import ceil_div as _ceil
from hypersdk.io import RangeReader

SECTOR = L.SECTOR
MAX_CAPACITY = 1 << 50  # 1 PiB: bigger than any VMDK (62 TB limit); protects the arithmetic
GT_CACHE = 1024  # grain tables kept decoded (2 KiB each at 512 entries)
EAGER_GT_BYTES = 16 * 1024 * 1024  # validate every grain table at open when they are this small
MAX_LISTED = 10  # problems of one kind that check lists before "... N more"
CHECK_BATCH = 64  # grains read (and inflated, on two threads) at once by check

ParentRead = Callable[[int, int], bytes]  # (offset, length) relative to this extent -> bytes


class SparseExtent:
    """One hosted sparse extent (KDMV header) inside ``reader`` (which it does not own)."""

    def __init__(self, reader: RangeReader, name: str):
        self.r = reader
        self.name = name
        self.file_size = reader.size
        self.descriptor: Descriptor | None = None
        # where unallocated grains read from (a delta's parent), extent-relative; None: zeros
        self.parent_read: ParentRead | None = None
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
        self.stream_layout = h.gd_offset == L.GD_AT_END  # tables behind markers, a footer
        if self.stream_layout:
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
        self._refuse_shared_tables()
        # allocated grains cannot outnumber what the file holds: a compressed grain takes at
        # least a sector of its own (and 1/1032 of a grain: deflate's best ratio), an
        # uncompressed one a whole grain
        least = max(SECTOR, self.grain_bytes // 1032) if self.compressed else self.grain_bytes
        self.max_grains = _ceil(self.file_size, least)
        if h.descriptor_offset and h.descriptor_size:
            if h.descriptor_size * SECTOR > L.MAX_DESCRIPTOR_BYTES:
                raise self._bad(f"embedded descriptor of {h.descriptor_size} sectors is too big")
            raw = self._read(
                h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR, "embedded descriptor"
            )
            self.descriptor = decode_descriptor(raw.split(b"\x00", 1)[0], self.name)
        if int(np.count_nonzero(self.gd)) * gt_bytes <= EAGER_GT_BYTES:
            for i in np.flatnonzero(self.gd).tolist():
                self._gt(i)

    def _refuse_shared_tables(self) -> None:
        """Two directory entries naming one grain table: corrupt, and a way for a tiny file to
        make every walk over the disk re-read one table a million times."""
        used = np.flatnonzero(self.gd)
        if len(used) < 2:
            return
        offs = self.gd[used]
        order = np.argsort(offs, kind="stable")
        same = np.flatnonzero(offs[order][1:] == offs[order][:-1])
        if len(same):
            i, j = sorted((int(used[order[same[0]]]), int(used[order[same[0] + 1]])))
            raise self._bad(
                f"grain directory entries {i} and {j} both point to the grain table at sector "
                f"{int(offs[order[same[0]]])} (corrupt or hostile image)"
            )

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
            if not d.eof:  # the stream stops short: a short grain must end its stream
                raise self._bad(f"grain {grain}: its deflate stream is truncated")
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
            if sector == 0 and self.parent_read is not None:
                n = 1  # one parent read for the whole run of unallocated grains
                while pos + take < end and self._entry(g + n) == 0:
                    take = min(take + gb, end - pos)
                    n += 1
                data = self.parent_read(pos, take)
                if len(data) != take:
                    raise self._bad(f"parent gave {len(data)} bytes for {pos}+{take}")
                parts.append(data)
            elif sector <= 1:
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

    def _tables(self, skip_bad: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(index, grain table) of every table in the directory, in guest order, counting the
        allocated grains against ``max_grains``; ``skip_bad`` passes over invalid tables."""
        grains = 0
        for i in np.flatnonzero(self.gd).tolist():
            try:
                gt = self._gt(i)
            except FormatError:
                if skip_bad:
                    continue
                raise
            if gt is None:
                continue
            grains += int(np.count_nonzero(gt > 1))
            if grains > self.max_grains:
                raise self._bad(
                    f"grain tables map more than {self.max_grains} grains, more than the file "
                    "can hold: grains are shared (corrupt or hostile image)"
                )
            yield i, gt

    def data_extents(self, base: int = 0) -> Iterator[Extent]:
        """Guest ranges of allocated (non-zero) grains, offset by ``base``, in order."""
        gb, per = self.grain_bytes, self.gt_entries
        for i, gt in self._tables():
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

    def layer_extents(self, base: int = 0) -> Iterator[Extent]:
        """This extent's own grains in guest order, offset by ``base``: allocated grains as data,
        zero grains as zero extents (in a delta they hide the parent); unallocated grains are
        absent (the parent shows through there)."""
        gb, per = self.grain_bytes, self.gt_entries
        for i, gt in self._tables():
            kind = np.where(gt > 1, 2, np.where(gt == 1, 1, 0)).astype(np.int8)
            if not kind.any():
                continue
            padded = np.concatenate(([0], kind, [0])).astype(np.int8)
            edges = np.flatnonzero(padded[1:] != padded[:-1]).tolist()
            for a, b in zip(edges, edges[1:], strict=False):
                k = int(kind[a])
                s = (i * per + a) * gb
                e = min((i * per + b) * gb, self.capacity)
                if k and e > s:
                    yield Extent(base + s, e - s, zero=k == 1)

    def check(self) -> list[str]:
        """Every table valid, the stream's markers in place, and every allocated grain
        readable: read (and inflated) one batch at a time, so memory stays bounded."""
        problems: list[str] = []
        seen: dict[str, int] = {}

        def add(kind: str, text: str) -> None:
            seen[kind] = seen.get(kind, 0) + 1
            if seen[kind] <= MAX_LISTED:
                problems.append(text)

        for i in np.flatnonzero(self.gd).tolist():
            try:
                self._gt(i)
            except FormatError as exc:
                add("table", exc.problem)
        if self.stream_layout:
            self._check_markers(add)
        try:
            batch: list[tuple[int, int]] = []
            for i, gt in self._tables(skip_bad=True):  # bad tables: reported above
                for j in np.flatnonzero(gt > 1).tolist():
                    batch.append((i * self.gt_entries + j, int(gt[j])))
                    if len(batch) >= CHECK_BATCH:
                        self._check_grains(batch, add)
                        batch = []
            self._check_grains(batch, add)
        except FormatError as exc:
            add("walk", exc.problem)
        for kind, n in seen.items():
            if n > MAX_LISTED:
                problems.append(f"... {n - MAX_LISTED} more problems like the above ({kind})")
        return problems

    def _check_markers(self, add) -> None:
        """A streamOptimized file puts a metadata marker before the directory and each table."""
        gd_sectors = _ceil(self.gd_entries * 4, SECTOR)
        gt_sectors = _ceil(self.gt_entries * 4, SECTOR)
        places = [(int(self.header.gd_offset), gd_sectors, L.MARKER_GD, "grain directory")]
        places += [
            (int(sector), gt_sectors, L.MARKER_GT, f"grain table {i}")
            for i, sector in enumerate(self.gd.tolist())
            if sector
        ]
        for sector, count, kind, what in places:
            if sector < 1 or sector * SECTOR > self.file_size:
                continue  # reported with the table itself
            marker = L.META_MARKER.unpack(self.r.read((sector - 1) * SECTOR, L.META_MARKER.size))
            if marker != (count, 0, kind):
                add("marker", f"{what} at sector {sector} is not preceded by its marker")

    def _check_grains(self, batch: list[tuple[int, int]], add) -> None:
        if not batch:
            return

        def one(job: tuple[int, int]) -> str | None:
            try:
                self._grain(*job)  # the data is dropped here, in the worker
            except FormatError as exc:
                return exc.problem
            except HyperSDKError as exc:  # an I/O error
                return str(exc)
            return None

        pool = _inflate_pool() if self.compressed else None
        results = pool.map(one, batch) if pool is not None else map(one, batch)
        for err in results:
            if err:
                add("grain", err)


_POOL: ThreadPoolExecutor | None = None


def _inflate_pool() -> ThreadPoolExecutor:
    """Two threads shared by every reader: inflating grains is CPU-bound, zlib drops the GIL."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmdk-inflate")
    return _POOL
