"""QCOW2 reader: v2 and v3, 512 B..2 MiB clusters, zero, unallocated and compressed clusters, and
backing chains (``_qcow2_backing``: depth 16, loops refused, names confined).

It refuses what it cannot read faithfully: encryption, external data files, extended L2 entries,
zstd, dirty or corrupt images. Headers are hostile, so the work is bounded by the real file
size whatever they claim: every table must lie inside the file, no L2 table may serve two L1
entries, and a walk over the whole disk stops as soon as it meets more data clusters than the
file can hold (``Limits``), so a small file cannot pose as petabytes of data.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.extents import ExtentCollector, ExtentMap
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats._qcow2_backing import open_backing
from hypersdk.formats._qcow2_check import Checker
from hypersdk.formats._qcow2_layout import COMP, STD, UNALLOC, ZERO
from hypersdk.formats._qcow2_layout import ceil_div as _ceil
from hypersdk.formats.base import DiskImage
from hypersdk.io import IO_CHUNK, RangeReader
from hypersdk.references import printable


class UnsupportedQcow2(UnsupportedFormatError):
    """A QCOW2 feature we refuse (encryption, external data file, subclusters...)."""


@dataclass
class Tally:
    """What one walk over the whole disk found (this image only, not its backing chain)."""

    extents: ExtentMap  # clusters holding data (standard or compressed)
    data_bytes: int
    compressed: int  # compressed clusters


class Limits:
    """Counts a whole-disk walk against what the file can hold: distinct standard clusters
    cannot outnumber the file's clusters, nor compressed ones what deflate can pack in it."""

    def __init__(self, image: Qcow2Image):
        fsize, cs = image.reader.size, image.cluster_size
        self.image = image
        self.max_std = _ceil(fsize, cs)
        self.max_comp = fsize // max(1, cs // L.MAX_DEFLATE_RATIO)
        self.std = self.comp = 0

    def count(self, std: int, comp: int) -> None:
        """Add one L2 table's standard clusters inside the file (those past its end cost
        nothing here: reading them fails) and compressed clusters."""
        self.std += std
        self.comp += comp
        if self.std > self.max_std:
            raise self.image._bad(
                f"L2 tables map more than {self.max_std} data clusters inside the file, "
                "which holds no more: clusters are shared (corrupt or hostile image)"
            )
        if self.comp > self.max_comp:
            raise self.image._bad(
                f"L2 tables map more than {self.max_comp} compressed clusters, more than "
                "the file can hold: clusters are shared (corrupt or hostile image)"
            )


class Qcow2Image(DiskImage):
    format = "qcow2"

    def __init__(self, reader: RangeReader):
        super().__init__(reader, 0)
        self.backing = None
        self._tally: Tally | None = None
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
        self._refuse_shared_l2(needed_l1)
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
                self.backing_format = data.split(b"\0", 1)[0].decode(errors="replace")
            pos += 8 + length + (-length % 8)

    def _refuse_shared_l2(self, needed: int) -> None:
        """No two L1 entries may name one L2 table (qemu never writes that, even with internal
        snapshots): else a few KiB of tables could pose as an exabyte of mapped clusters."""
        used = self._l1_used[self._l1_used < needed]
        if len(used) < 2:
            return
        offs = self.l1[used] & np.uint64(L.OFFSET_MASK)
        order = np.argsort(offs, kind="stable")
        same = np.flatnonzero(offs[order][1:] == offs[order][:-1])
        if len(same):
            i, j = sorted((int(used[order[same[0]]]), int(used[order[same[0] + 1]])))
            raise self._bad(
                f"L1 entries {i} and {j} both point to the L2 table at "
                f"{int(offs[order[same[0]]]):#x} (corrupt or hostile image)"
            )

    def _open_backing(self) -> None:
        self.backing = open_backing(self.reader, self.name, self.backing_file, self.backing_format)

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

    def _segments(
        self, first: int, end: int, limits: Limits | None = None
    ) -> Iterator[tuple[int, int, int, int]]:
        """(kind, first guest cluster, count, entry of the first) over guest clusters
        [first, end); STD runs are host-contiguous, COMP runs are single clusters."""
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
                yield UNALLOC, c, stop - c, 0
                c = stop
                continue
            ent = table[c - j * E : stop - j * E]
            comp = (ent & np.uint64(L.OFLAG_COMPRESSED)) != 0
            off = ent & np.uint64(L.OFFSET_MASK)
            zflag = (ent & np.uint64(L.OFLAG_ZERO)) != 0
            if self.version < 3 and bool((zflag & ~comp).any()):
                raise self._bad("zero-flagged cluster in a version 2 image")
            kinds = np.full(len(ent), STD, dtype=np.int8)
            kinds[(off == 0) & ~comp] = UNALLOC
            kinds[zflag & ~comp] = ZERO
            kinds[comp] = COMP
            std = kinds == STD
            if limits is not None:  # before yielding anything of this table
                inside = int(np.count_nonzero(off[std] < np.uint64(self.reader.size)))
                limits.count(inside, int(np.count_nonzero(comp)))
            if bool((off[std] % np.uint64(cs)).any()):
                raise self._bad("data cluster offset is not cluster aligned")
            brk = np.ones(len(ent), dtype=bool)
            if len(ent) > 1:
                same = kinds[1:] == kinds[:-1]
                contig = (off[1:] == off[:-1] + np.uint64(cs)) | (kinds[1:] != STD)
                brk[1:] = ~(same & contig) | (kinds[1:] == COMP)
            starts = np.flatnonzero(brk)
            counts = np.diff(starts, append=len(ent)).tolist()
            for k, s, n, e in zip(
                kinds[starts].tolist(), starts.tolist(), counts, ent[starts].tolist(), strict=True
            ):
                yield k, c + s, n, e
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
        return list(self._inflater().map(self._inflate, offs, blobs))

    def _inflater(self) -> ThreadPoolExecutor:
        """Two threads for inflating: zlib releases the GIL."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qcow2-inflate")
        return self._pool

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
            if kind == STD:
                host = (entry & L.OFFSET_MASK) + (a - c * cs)
                if (entry & L.OFFSET_MASK) + (count - 1) * cs >= fsize:
                    raise self._bad(
                        f"cluster for guest offset {a} lies beyond the end of the file (truncated?)"
                    )
                parts.append(self.reader.read(host, b - a))
            elif kind == COMP:
                comp.append((len(parts), entry, a - c * cs, b - c * cs))
                parts.append(b"")
            elif kind == ZERO:
                parts.append(bytes(b - a))
            else:
                parts.append(self._read_backing(a, b - a))
        if comp:
            clusters = self._read_compressed_many([e for _, e, _, _ in comp])
            for (k, _, lo, hi), data in zip(comp, clusters, strict=True):
                parts[k] = data[lo:hi]
        return b"".join(parts)

    def _walk(self) -> Iterator[tuple[int, int, int, int]]:
        """``_segments`` over the whole disk, counted against what the file can hold."""
        end = _ceil(self.virtual_size, self.cluster_size)
        return self._segments(0, end, Limits(self))

    def tally(self) -> Tally:
        """One walk over this image's own tables (never its backing chain's), kept."""
        if self._tally is None:
            cs, size = self.cluster_size, self.virtual_size
            out = ExtentCollector(size)
            data = comp = 0
            for kind, c, count, _ in self._walk():  # in guest order
                if kind in (STD, COMP):
                    a, b = c * cs, min(size, (c + count) * cs)
                    out.add(a, b - a)
                    data += b - a
                    comp += count if kind == COMP else 0
            self._tally = Tally(out.build(), data, comp)
        return self._tally

    def own_extents(self) -> ExtentMap:
        return self.tally().extents

    def extents(self) -> ExtentMap:
        if self.backing is None:
            return self.own_extents()
        cs, size = self.cluster_size, self.virtual_size
        out = ExtentCollector(size)
        base = self.backing.extents().data()
        shown = next(base, None)  # the backing's next data extent, where it shows through
        for kind, c, count, _ in self._walk():  # in guest order
            a, b = c * cs, min(size, (c + count) * cs)
            if kind in (STD, COMP):
                out.add(a, b - a)
            elif kind == UNALLOC:
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
        return {
            "compat": "1.1" if self.version >= 3 else "0.10",
            "cluster_size": self.cluster_size,
            "refcount_bits": 1 << h.refcount_order,
            "backing_file": printable(self.backing_file) if self.backing_file else None,
            "backing_format": printable(self.backing_format) if self.backing_format else None,
            "snapshots": h.nb_snapshots,
            "compressed_clusters": self.tally().compressed,
        }

    def check(self) -> list[str]:
        problems: list[str] = []
        try:
            Checker(self, problems).run()
        except FormatError as exc:
            problems.append(exc.problem)
        return problems

    def _close_backing(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def close(self) -> None:
        self._close_backing()
        self._tally = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        super().close()
