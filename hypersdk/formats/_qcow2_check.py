"""QCOW2 consistency check: what qemu-img check verifies, and whether every cluster can be read.

Three passes, each bounded by the real file size whatever the header claims:

* the internal snapshot table: at most 65536 entries, each inside the file, each snapshot's L1
  table a valid table (qemu-img check reports the same);
* references: every cluster the header, the tables and the active L2 tables point to is counted
  (each distinct L2 table once) and compared with the stored refcounts (skipped with internal
  snapshots or bitmaps, whose references we do not walk, and above 16 Mi file clusters);
* data: every allocated cluster of this image (not its backing chain) is read, streamed, and
  every compressed one inflated, so a corrupt deflate stream or an unreadable cluster is found
  (qemu-img check never reads data and calls such an image clean).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from hypersdk.errors import FormatError, HyperSDKError
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats._qcow2_layout import ceil_div as _ceil
from hypersdk.io import IO_CHUNK

if TYPE_CHECKING:
    from hypersdk.formats._qcow2_reader import Qcow2Image

MAX_CLUSTERS = 1 << 24  # refcounts are recounted for files of up to this many clusters (64 MiB)
MAX_LISTED = 10  # problems of one kind listed before "... N more"
INFLATE_BATCH = 16 << 20  # compressed bytes inflated per batch of the data pass


class Problems:
    """Problems found, at most MAX_LISTED of each kind, then a count of the rest."""

    def __init__(self, out: list[str]):
        self.out = out
        self.seen: Counter[str] = Counter()

    def add(self, kind: str, text: str) -> None:
        self.seen[kind] += 1
        if self.seen[kind] <= MAX_LISTED:
            self.out.append(text)

    def close(self) -> None:
        for kind, n in self.seen.items():
            if n > MAX_LISTED:
                self.out.append(f"... {n - MAX_LISTED} more: {kind}")


class Checker:
    """Check one opened image; ``run`` appends what it finds to ``problems``."""

    def __init__(self, image: Qcow2Image, problems: list[str]):
        self.img = image
        self.cs = image.cluster_size
        self.fsize = image.reader.size
        self.p = Problems(problems)

    def run(self) -> None:
        try:
            for step in (self._snapshots, self._references, self._data):
                try:
                    step()
                except FormatError as exc:
                    self.p.add("unreadable", exc.problem)
                except HyperSDKError as exc:  # an I/O error of the file itself
                    self.p.add("unreadable", str(exc))
        finally:
            self.p.close()

    # -- snapshots -----------------------------------------------------------------------------
    def _snapshots(self) -> None:
        h, cs, fsize = self.img.header, self.cs, self.fsize
        n = h.nb_snapshots
        if n == 0:
            return
        if n > L.MAX_SNAPSHOTS:
            self.p.add(
                "snapshot table",
                f"snapshot table too large: {n} snapshots (at most {L.MAX_SNAPSHOTS})",
            )
            return
        if h.snapshots_offset % cs or h.snapshots_offset == 0:
            self.p.add(
                "snapshot table", f"snapshot table offset {h.snapshots_offset:#x} is invalid"
            )
            return
        pos, end = h.snapshots_offset, h.snapshots_offset + L.MAX_SNAPSHOT_TABLE_BYTES
        for i in range(n):
            if pos + L.SNAPSHOT.size > min(fsize, end):
                self.p.add(
                    "snapshot table",
                    f"snapshot table entry {i} (of {n}) at {pos:#x} lies beyond the end of "
                    "the file: the snapshot table is incomplete",
                )
                return
            l1_off, l1_size, id_size, name_size, *_, extra = L.SNAPSHOT.unpack(
                self.img.reader.read(pos, L.SNAPSHOT.size)
            )
            if extra > L.MAX_SNAPSHOT_EXTRA:
                self.p.add("snapshot table", f"snapshot {i} has {extra} bytes of extra data")
                return
            pos += L.SNAPSHOT.size + extra + id_size + name_size
            if pos > min(fsize, end):  # the padding of the last entry may be past the end
                self.p.add("snapshot table", f"snapshot table entry {i} is incomplete")
                return
            pos += -pos % 8
            if l1_size * 8 > L.MAX_L1_BYTES or l1_off % cs or l1_off + l1_size * 8 > fsize:
                self.p.add(
                    "snapshot L1",
                    f"snapshot {i}: L1 table at {l1_off:#x} ({l1_size} entries) is invalid",
                )

    # -- references ----------------------------------------------------------------------------
    def _references(self) -> None:
        img, h, cs, fsize = self.img, self.img.header, self.cs, self.fsize
        n = _ceil(fsize, cs)
        recount = n <= MAX_CLUSTERS and h.nb_snapshots == 0 and L.EXT_BITMAPS not in img.extensions
        counts = np.zeros(n + 1 if recount else 1, dtype=np.uint32)  # last: beyond EOF

        def ref(offs: np.ndarray, length: int | np.ndarray, what: str) -> None:
            """References to ``offs`` (uint64) spanning ``length`` bytes each."""
            if not len(offs):
                return
            ends = offs + np.asarray(length, dtype=np.uint64)
            past = np.flatnonzero(ends > np.uint64(fsize))
            for k in past[:MAX_LISTED].tolist():
                self.p.add(what, f"{what} at {int(offs[k]):#x} points beyond the end of the file")
            if len(past) > MAX_LISTED:
                self.p.seen[what] += len(past) - MAX_LISTED
            if not recount:
                return
            first = np.minimum(offs // np.uint64(cs), np.uint64(n)).astype(np.int64)
            last = np.minimum((ends - np.uint64(1)) // np.uint64(cs), np.uint64(n)).astype(np.int64)
            np.add.at(counts, first, 1)
            two = last != first  # a compressed cluster may straddle two host clusters
            np.add.at(counts, last[two], 1)
            if bool((last - first > 1).any()):  # tables spanning clusters: count every one
                for a, b in zip(first[last - first > 1], last[last - first > 1], strict=True):
                    counts[a + 1 : b] += 1

        one = lambda off: np.array([off], dtype=np.uint64)  # noqa: E731
        ref(one(0), cs, "header")
        if h.l1_size:
            ref(one(h.l1_table_offset), h.l1_size * 8, "L1 table")
        rt_bytes = h.refcount_table_clusters * cs
        ref(one(h.refcount_table_offset), rt_bytes, "refcount table")
        reft = np.frombuffer(img.reader.read(h.refcount_table_offset, rt_bytes), dtype=">u8")
        blocks = reft.astype(np.uint64) & np.uint64(L.REFT_OFFSET_MASK)
        ref(blocks[blocks != 0], cs, "refcount block")
        self._l2_references(ref)
        if recount:
            self._compare_refcounts(blocks, counts, n)

    def _l2_references(self, ref) -> None:
        """References from the active L1 and from each distinct L2 table it names (an L1 entry
        past the disk's end included: qemu counts it too)."""
        img, cs, fsize = self.img, self.cs, self.fsize
        used = np.flatnonzero(img.l1 & np.uint64(L.OFFSET_MASK))
        offs = img.l1[used] & np.uint64(L.OFFSET_MASK)
        bad = (offs % np.uint64(cs) != 0) | (offs + np.uint64(cs) > np.uint64(fsize))
        for j in used[bad][:MAX_LISTED].tolist():
            self.p.add(
                "L1 entry",
                f"L1 entry {j} points to an invalid L2 table at "
                f"{int(img.l1[j]) & L.OFFSET_MASK:#x}",
            )
        self.p.seen["L1 entry"] += max(0, int(bad.sum()) - MAX_LISTED)
        ref(offs[~bad], cs, "L2 table")
        x, mask = L.compressed_fields(img.cluster_bits)
        # each distinct table once: a table named twice is counted twice above, read once here
        for off in np.unique(offs[~bad]).tolist():
            table = np.frombuffer(img.reader.read(off, cs), dtype=">u8").astype(np.uint64)
            comp = (table & np.uint64(L.OFLAG_COMPRESSED)) != 0
            c = table[comp]
            coff = c & np.uint64((1 << x) - 1)
            nsect = ((c >> np.uint64(x)) & np.uint64(mask)) + np.uint64(1)
            span = nsect * np.uint64(L.SECTOR) - (coff & np.uint64(L.SECTOR - 1))
            ref(coff, span, "compressed cluster")
            std = table[~comp] & np.uint64(L.OFFSET_MASK)
            std = std[std != 0]
            misaligned = std % np.uint64(cs) != 0
            for hoff in std[misaligned][:MAX_LISTED].tolist():
                self.p.add(
                    "unaligned", f"L2 table at {off:#x}: data cluster {hoff:#x} is not aligned"
                )
            ref(std[~misaligned], cs, "data cluster")

    def _compare_refcounts(self, blocks: np.ndarray, counts: np.ndarray, n: int) -> None:
        """Stored refcounts against ``counts``, one refcount block at a time."""
        img, cs = self.img, self.cs
        order = img.header.refcount_order
        if order < 3:
            return  # sub-byte refcounts: not verified
        dtype = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]
        per_block = cs * 8 >> order
        for i in range(_ceil(n, per_block)):
            first = i * per_block
            take = min(per_block, n - first)
            b = int(blocks[i]) if i < len(blocks) else 0
            if b and (b % cs or b + cs > self.fsize):
                self.p.add("refcount block", f"refcount block {i} at {b:#x} is invalid")
                continue
            stored = (
                np.frombuffer(img.reader.read(b, cs), dtype=dtype)[:take].astype(np.uint64)
                if b
                else np.zeros(take, dtype=np.uint64)
            )
            want = counts[first : first + take].astype(np.uint64)
            for k in np.flatnonzero(stored != want).tolist():
                self.p.add(
                    "refcount mismatch",
                    f"refcount mismatch for cluster {first + k}: stored {int(stored[k])}, "
                    f"referenced {int(want[k])}",
                )

    # -- data ----------------------------------------------------------------------------------
    def _data(self) -> None:
        """Read every allocated cluster of this image, and inflate every compressed one."""
        img, cs, fsize = self.img, self.cs, self.fsize
        img.tally()  # one cheap walk first: more clusters than the file holds stop us here
        batch: list[tuple[int, int, int]] = []  # (guest cluster, host offset, length)
        size = 0
        for kind, c, count, entry in img._walk():  # counted against what the file holds
            if kind == L.STD:
                host = entry & L.OFFSET_MASK
                stop = min(host + count * cs, fsize)  # past EOF: reported by the references
                for pos in range(host, stop, IO_CHUNK):
                    try:
                        img.reader.read(pos, min(IO_CHUNK, stop - pos))
                    except HyperSDKError as exc:
                        self.p.add("read", f"data at guest offset {c * cs}: {exc}")
            elif kind == L.COMP:
                try:
                    off, n = img._compressed_span(entry)
                except FormatError:
                    continue  # beyond the end of the file: reported by the references
                batch.append((c, off, n))
                size += n
                if size >= INFLATE_BATCH:  # bounded memory: inflate what is gathered
                    self._inflate(batch)
                    batch, size = [], 0
        self._inflate(batch)

    def _inflate(self, batch: list[tuple[int, int, int]]) -> None:
        """Inflate a batch on the image's two inflate threads; the output is dropped at once."""
        if not batch:
            return
        read = self.img.reader.read
        jobs = [(off, read(off, n)) for _, off, n in batch]  # reads stay in this thread
        half = -(-len(jobs) // 2)  # two lists, one per inflate thread: no future per cluster
        errors = self.img._inflater().map(self._try_inflate, [jobs[:half], jobs[half:]])
        for (c, _, _), err in zip(batch, [e for part in errors for e in part], strict=True):
            if err:
                self.p.add("compressed", f"guest offset {c * self.cs}: {err}")

    def _try_inflate(self, jobs: list[tuple[int, bytes]]) -> list[str | None]:
        out: list[str | None] = []
        for off, data in jobs:
            try:
                self.img._inflate(off, data)  # the output is dropped here, in the worker
                out.append(None)
            except FormatError as exc:
                out.append(exc.problem)
        return out
