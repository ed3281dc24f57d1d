"""ESXi seSparse extents (VMFS-6 snapshot deltas, ESXi 6.5+), read-only.

A snapshot's descriptor (``createType="seSparse"``) names one ``SESPARSE`` extent and, with
``parentFileNameHint``, the disk it is a delta of. The extent file (undocumented; laid out as
qemu's block/vmdk.c reads it; every number a little-endian u64, offsets and sizes in 512-byte
sectors)::

    sector 0        const header: magic 0xcafebabe, version 0x200000001, capacity,
                    grain_size 8 (4 KiB grains), grain_table_size 64 (4096 entries), flags 0,
                    then offset/size pairs of the regions below
    volatile hdr    magic 0xcafecafe, free_gt_number, next_txn_seq_number, replay_journal
    journal         (header + log; read by nobody but ESXi)
    grain directory u64 entries, one per 16 MiB of guest: 0 = no table, else
                    0x10000000_<table number> (top 32 bits exactly that)
    grain tables    4096 u64 entries each, at grain_tables_offset + number * 64
    free bitmap, backmap
    grains          4 KiB each, at grains_offset + cluster * 8

A grain table entry's top nibble is its type: 0 unallocated (the entry must be all zero; the
grain reads from the parent), 1 unmapped and 2 zero (both read as zeros, whatever the low bits
hold: ESXi may leave a stale cluster number in an unmapped entry), 3 allocated, with the cluster
number ``c`` stored as ``(c & 0xfff) << 48 | c >> 12``. qemu and Xen Orchestra read unmapped as
zeros; dissect.hypervisor reads it through to the parent, which we think is wrong (an unmapped
guest range must not resurrect the parent's old data).

Journal: a volatile header with ``replay_journal`` set means the snapshot holds transactions
that were never applied to the tables (ESXi crashed or the file was copied while in use). The
journal format is undocumented and qemu refuses such files too ("Replaying journal not
supported"), so we refuse them (UnsupportedFormatError) rather than guess: ESXi replays it the
next time it opens the disk.

Bounds: every region read is checked against the real file size before it is read; only the
grain-directory entries the capacity needs are read (at most 4 Mi for the 64 TiB maximum); the
directory's table numbers are validated at open (inside the file, none shared), so walking all
tables costs at most one pass over the file's own bytes; decoded tables are cached (LRU).

Use (the VMDK driver, for a ``SESPARSE`` extent line of a seSparse descriptor)::

    sub = opener(name)                       # the extent file's RangeReader
    if not is_sesparse(sub.read(0, 8)): ...  # FormatError
    ext = SeSparseExtent(sub, capacity_sectors=line.sectors)
    ext.parent_read = lambda off, n: parent.read(part_start + off, n)   # or None: zeros
    ext.read(off, n)                         # extent-relative guest bytes
    ext.overlay(parent_extents_of_this_range)  # data map of the disk (parent shows through)
    ext.extents()                            # this delta's own grains (data + zero extents)
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.io import RangeReader

SECTOR = 512
GRAIN = 4096
GRAIN_SECTORS = GRAIN // SECTOR
GT_ENTRIES = 4096
GT_SECTORS = GT_ENTRIES * 8 // SECTOR
GT_BYTES = GT_ENTRIES * 8
GT_COVERAGE = GT_ENTRIES * GRAIN  # 16 MiB of guest per grain table

SESPARSE_MAGIC = 0xCAFEBABE
SESPARSE_MAGIC_BYTES = struct.pack("<Q", SESPARSE_MAGIC)
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x200000001  # "2.1", the only one qemu and ESXi 6.5-8 write
MAX_CAPACITY = 64 << 40  # seSparse's limit (qemu: "slightly less than 64TB")
GT_CACHE = 256  # decoded tables kept (36 KiB each)
MAX_PROBLEMS = 50  # check() stops listing after this many

UNALLOCATED, UNMAPPED, ZERO, ALLOCATED = 0, 1, 2, 3
_GD_TAG = 0x10000000  # top 32 bits of an allocated grain-directory entry

ParentRead = Callable[[int, int], bytes]


class ConstHeader(NamedTuple):
    magic: int
    version: int
    capacity: int
    grain_size: int
    grain_table_size: int
    flags: int
    reserved1: int
    reserved2: int
    reserved3: int
    reserved4: int
    volatile_header_offset: int
    volatile_header_size: int
    journal_header_offset: int
    journal_header_size: int
    journal_offset: int
    journal_size: int
    grain_dir_offset: int
    grain_dir_size: int
    grain_tables_offset: int
    grain_tables_size: int
    free_bitmap_offset: int
    free_bitmap_size: int
    backmap_offset: int
    backmap_size: int
    grains_offset: int
    grains_size: int


class VolatileHeader(NamedTuple):
    magic: int
    free_gt_number: int
    next_txn_seq_number: int
    replay_journal: int


CONST = struct.Struct("<26Q")  # 208 bytes, then 304 bytes that must be zero
VOLATILE = struct.Struct("<4Q")  # 32 bytes, then 480 bytes that must be zero


def is_sesparse(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts with the seSparse const magic."""
    return head[:8] == SESPARSE_MAGIC_BYTES


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


_NO_TABLE = (_frozen(np.zeros(GT_ENTRIES, np.uint8)), _frozen(np.zeros(GT_ENTRIES, np.int64)))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class SeSparseExtent:
    """One seSparse extent file over ``reader`` (which it does not own).

    ``capacity_sectors``: the size the descriptor's extent line gives (None: the header's); it
    may not exceed the header's capacity. ``parent_read(offset, length)`` supplies the bytes of
    unallocated grains, at extent-relative offsets (None: they read as zeros).
    """

    def __init__(
        self,
        reader: RangeReader,
        capacity_sectors: int | None = None,
        parent_read: ParentRead | None = None,
        name: str | None = None,
    ):
        self.r = reader
        self.name = name or reader.name
        self.file_size = reader.size
        self.parent_read = parent_read
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._open(capacity_sectors)

    # ------------------------------------------------------------------------------ opening
    def _bad(self, problem: str) -> FormatError:
        return FormatError(self.name, problem)

    def _read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self._bad(
                f"seSparse {what} at {offset}+{length} lies beyond the end of the file "
                f"({self.file_size} bytes): truncated or corrupt"
            )
        return self.r.read(offset, length)

    def _open(self, capacity_sectors: int | None) -> None:
        if self.file_size < SECTOR:
            raise self._bad(f"only {self.file_size} bytes: too short for a seSparse header")
        head = self.r.read(0, SECTOR)
        if not is_sesparse(head):
            raise self._bad("no seSparse magic (0xcafebabe): not a seSparse extent")
        h = self.header = ConstHeader._make(CONST.unpack_from(head))
        if h.version != VERSION:
            raise UnsupportedFormatError(
                self.name, f"seSparse version {h.version:#x} is unsupported (only {VERSION:#x})"
            )
        if h.grain_size != GRAIN_SECTORS or h.grain_table_size != GT_SECTORS:
            raise UnsupportedFormatError(
                self.name,
                f"seSparse grain size {h.grain_size} / grain table size {h.grain_table_size} "
                f"sectors are unsupported (only {GRAIN_SECTORS} / {GT_SECTORS})",
            )
        if h.flags:
            raise UnsupportedFormatError(self.name, f"seSparse flags {h.flags:#x} are unsupported")
        if (
            h.reserved1
            or h.reserved2
            or h.reserved3
            or h.reserved4
            or head[CONST.size :].strip(b"\0")
        ):
            raise UnsupportedFormatError(
                self.name, "seSparse header has non-zero reserved fields or padding"
            )
        for field in ("volatile_header_offset", "grain_dir_offset", "grain_tables_offset"):
            if getattr(h, field) == 0:
                raise self._bad(f"seSparse {field.replace('_', ' ')} is 0 (the header's place)")
        if h.grains_offset == 0:
            raise self._bad("seSparse grains offset is 0 (the header's place)")
        header_capacity = h.capacity * SECTOR
        if not 0 < header_capacity <= MAX_CAPACITY:
            raise self._bad(f"seSparse capacity of {h.capacity} sectors is implausible")
        if capacity_sectors is None:
            self.capacity = header_capacity
        elif 0 < capacity_sectors <= h.capacity:
            self.capacity = capacity_sectors * SECTOR
        else:
            raise self._bad(
                f"descriptor gives the seSparse extent {capacity_sectors} sectors, its header "
                f"holds {h.capacity}"
            )
        self._open_volatile()
        self._open_directory()

    def _open_volatile(self) -> None:
        h = self.header
        raw = self._read(h.volatile_header_offset * SECTOR, SECTOR, "volatile header")
        v = self.volatile = VolatileHeader._make(VOLATILE.unpack_from(raw))
        if v.magic != VOLATILE_MAGIC:
            raise self._bad(f"seSparse volatile header magic {v.magic:#x} is not 0xcafecafe")
        if v.replay_journal:
            raise UnsupportedFormatError(
                self.name,
                "seSparse journal holds unapplied changes (the snapshot was not closed cleanly): "
                "replaying it is unsupported; let ESXi open the disk (power the VM on and off, "
                "or consolidate) and export again",
            )
        if raw[VOLATILE.size :].strip(b"\0"):
            raise UnsupportedFormatError(self.name, "seSparse volatile header padding is not zero")

    def _open_directory(self) -> None:
        h = self.header
        self.n_grains = _ceil(self.capacity, GRAIN)
        need = _ceil(self.n_grains, GT_ENTRIES)
        have = h.grain_dir_size * (SECTOR // 8)
        if have < need:
            raise self._bad(
                f"seSparse grain directory of {have} entries covers {have * GT_COVERAGE} bytes, "
                f"less than the capacity ({self.capacity})"
            )
        raw = self._read(h.grain_dir_offset * SECTOR, need * 8, "grain directory")
        gd = np.frombuffer(raw, dtype="<u8")
        used = gd != 0
        bad = used & ((gd >> np.uint64(32)) != _GD_TAG)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._bad(
                f"seSparse grain directory entry {i} ({int(gd[i]):#018x}) is not a grain table "
                "reference"
            )
        tables = (gd & np.uint64(0xFFFFFFFF)).astype(np.int64)
        tables[~used] = -1
        self._gd = tables
        numbers = tables[used]
        if numbers.size:
            fits = (self.file_size // SECTOR - h.grain_tables_offset) // GT_SECTORS
            over = used & (tables >= fits)
            if over.any():
                i = int(np.flatnonzero(over)[0])
                raise self._bad(
                    f"seSparse grain table {int(tables[i])} (grain directory entry {i}) lies "
                    f"beyond the end of the file ({self.file_size} bytes): truncated or corrupt"
                )
            uniq, counts = np.unique(numbers, return_counts=True)
            if (counts > 1).any():
                n = int(uniq[np.flatnonzero(counts > 1)[0]])
                a, b = np.flatnonzero(tables == n)[:2].tolist()
                raise self._bad(
                    f"seSparse grain directory entries {a} and {b} share grain table {n}: corrupt"
                )
        # the highest cluster number whose whole grain lies inside the file (may be -1)
        self._max_cluster = (self.file_size // SECTOR - h.grains_offset) // GRAIN_SECTORS - 1

    # ------------------------------------------------------------------------------- tables
    def _table(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(types uint8, cluster numbers int64) of the 4096 grains under directory entry ``i``;
        all unallocated when the directory has no table there. Entries past the capacity read
        as unallocated and are not judged (nothing ever reads them)."""
        cached = self._cache.get(i)
        if cached is not None:
            self._cache.move_to_end(i)
            return cached
        number = int(self._gd[i])
        if number < 0:
            return _NO_TABLE
        sector = self.header.grain_tables_offset + number * GT_SECTORS
        raw = self._read(sector * SECTOR, GT_BYTES, f"grain table {number}")
        e = np.frombuffer(raw, dtype="<u8").copy()
        live = self.n_grains - i * GT_ENTRIES
        if live < GT_ENTRIES:
            e[live:] = 0
        types = (e >> np.uint64(60)).astype(np.uint8)
        base = i * GT_ENTRIES
        odd = types > ALLOCATED
        if odd.any():
            j = int(np.flatnonzero(odd)[0])
            raise self._bad(
                f"seSparse grain {base + j}: grain table entry {int(e[j]):#018x} has unknown "
                f"type {int(types[j])}"
            )
        stray = (types == UNALLOCATED) & (e != 0)
        if stray.any():
            j = int(np.flatnonzero(stray)[0])
            raise self._bad(
                f"seSparse grain {base + j}: unallocated grain table entry {int(e[j]):#018x} "
                "has stray bits"
            )
        alloc = types == ALLOCATED
        clusters = ((e & np.uint64(0x0FFF000000000000)) >> np.uint64(48)) | (
            (e & np.uint64(0x0000FFFFFFFFFFFF)) << np.uint64(12)
        )
        clusters[~alloc] = 0
        top = self._max_cluster
        past = alloc if top < 0 else alloc & (clusters > np.uint64(top))
        if past.any():
            j = int(np.flatnonzero(past)[0])
            raise self._bad(
                f"seSparse grain {base + j} in cluster {int(clusters[j])} lies beyond the end "
                f"of the file ({self.file_size} bytes): truncated or corrupt"
            )
        out = (types, clusters.astype(np.int64))
        self._cache[i] = out
        if len(self._cache) > GT_CACHE:
            self._cache.popitem(last=False)
        return out

    def _span(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        """(types, clusters) of grains [g0, g1)."""
        types, clusters = [], []
        for i in range(g0 // GT_ENTRIES, (g1 - 1) // GT_ENTRIES + 1):
            t, c = self._table(i)
            a = max(g0 - i * GT_ENTRIES, 0)
            b = min(g1 - i * GT_ENTRIES, GT_ENTRIES)
            types.append(t[a:b])
            clusters.append(c[a:b])
        if len(types) == 1:
            return types[0], clusters[0]
        return np.concatenate(types), np.concatenate(clusters)

    # --------------------------------------------------------------------------------- read
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes of this extent (offsets relative to its start). Runs of grains that lie
        one after the other in the file are read at once; unallocated runs come from
        ``parent_read`` in one call each."""
        end = offset + length
        if offset < 0 or length < 0 or end > self.capacity:
            raise self._bad(f"read {offset}+{length} beyond the extent's {self.capacity} bytes")
        if length == 0:
            return b""
        g0, g1 = offset // GRAIN, _ceil(end, GRAIN)
        types, clusters = self._span(g0, g1)
        if g1 - g0 > 1:
            cut = (types[1:] != types[:-1]) | (
                (types[1:] == ALLOCATED) & (clusters[1:] != clusters[:-1] + 1)
            )
            bounds = [0, *(np.flatnonzero(cut) + 1).tolist(), g1 - g0]
        else:
            bounds = [0, 1]
        grains_at = self.header.grains_offset * SECTOR
        parts: list[bytes] = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            lo = max(offset, (g0 + a) * GRAIN)
            n = min(end, (g0 + b) * GRAIN) - lo
            kind = int(types[a])
            if kind == ALLOCATED:
                at = grains_at + int(clusters[a]) * GRAIN + lo - (g0 + a) * GRAIN
                parts.append(self.r.read(at, n))
            elif kind == UNALLOCATED and self.parent_read is not None:
                data = self.parent_read(lo, n)
                if len(data) != n:
                    raise self._bad(f"parent gave {len(data)} bytes for {lo}+{n}")
                parts.append(data)
            else:
                parts.append(bytes(n))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ------------------------------------------------------------------------------ extents
    def iter_extents(self, base: int = 0) -> Iterator[Extent]:
        """This delta's own grains in guest order, shifted by ``base``: allocated grains as data
        extents, zero and unmapped grains as zero extents (they hide the parent); unallocated
        grains are absent (the parent shows through). Adjacent extents of one kind merged."""
        pending: Extent | None = None
        for i in np.flatnonzero(self._gd >= 0).tolist():
            types, _ = self._table(i)
            kind = np.where(types == ALLOCATED, 2, np.where(types == UNALLOCATED, 0, 1))
            padded = np.concatenate(([0], kind, [0]))
            edges = np.flatnonzero(padded[1:] != padded[:-1]).tolist()
            for a, b in zip(edges, edges[1:], strict=False):
                k = int(kind[a])
                if k == 0:
                    continue
                s = (i * GT_ENTRIES + a) * GRAIN
                e = min((i * GT_ENTRIES + b) * GRAIN, self.capacity)
                if e <= s:
                    continue
                zero = k == 1
                if pending is not None and pending.end == base + s and pending.zero == zero:
                    pending = Extent(pending.offset, pending.length + e - s, zero)
                    continue
                if pending is not None:
                    yield pending
                pending = Extent(base + s, e - s, zero)
        if pending is not None:
            yield pending

    def extents(self) -> ExtentMap:
        """``iter_extents()`` as a map over the extent's capacity (a delta's own map)."""
        out = ExtentCollector(self.capacity)
        out.extend(self.iter_extents())
        return out.build()

    def overlay(self, parent: Iterable[Extent] = ()) -> ExtentMap:
        """The data map of the disk this delta presents: its allocated grains, plus the parent's
        data extents (extent-relative, in order) where its grains are unallocated. Zero and
        unmapped grains hide the parent. With no parent: the allocated grains alone."""
        out = ExtentCollector(self.capacity)
        shown = (e for e in parent if not e.zero)
        cur = next(shown, None)

        def through(a: int, b: int) -> None:
            nonlocal cur
            while cur is not None and cur.end <= a:
                cur = next(shown, None)
            while cur is not None and cur.offset < b:
                lo = max(a, cur.offset)
                out.add(lo, min(b, cur.end) - lo)
                if cur.end > b:
                    break
                cur = next(shown, None)

        pos = 0
        for e in self.iter_extents():
            through(pos, e.offset)
            if not e.zero:
                out.add(e.offset, e.length)
            pos = e.end
        through(pos, self.capacity)
        return out.build()

    # -------------------------------------------------------------------------- check, info
    def check(self) -> list[str]:
        """Problems found walking every grain table: bad entries, tables or grains outside their
        header regions, clusters used by two grains. Bounded by the file's size."""
        h = self.header
        problems: list[str] = []
        table_room = h.grain_tables_size // GT_SECTORS
        grain_room = h.grains_size // GRAIN_SECTORS
        seen = np.zeros(max(self._max_cluster + 1, 0), dtype=bool)
        for i in np.flatnonzero(self._gd >= 0).tolist():
            if len(problems) >= MAX_PROBLEMS:
                problems.append("... (more problems not listed)")
                break
            number = int(self._gd[i])
            if number >= table_room:
                problems.append(
                    f"grain table {number} lies outside the grain tables region "
                    f"({table_room} tables)"
                )
            try:
                types, clusters = self._table(i)
            except FormatError as exc:
                problems.append(exc.problem)
                continue
            used = clusters[types == ALLOCATED]
            if used.size == 0:
                continue
            if int(used.max()) >= grain_room:
                problems.append(
                    f"grain table {number} points at cluster {int(used.max())}, outside the "
                    f"grains region ({grain_room} grains)"
                )
            if np.unique(used).size != used.size or seen[used].any():
                problems.append(f"grain table {number} points at clusters used by another grain")
            seen[used] = True
        return problems

    def info(self) -> dict:
        h, v = self.header, self.volatile
        return {
            "subformat": "seSparse",
            "version": "2.1",
            "capacity": self.capacity,
            "header_capacity": h.capacity * SECTOR,
            "grain_size": GRAIN,
            "grain_tables": int(np.count_nonzero(self._gd >= 0)),
            "free_gt_number": v.free_gt_number,
            "next_txn_seq_number": v.next_txn_seq_number,
        }
