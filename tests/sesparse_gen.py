"""Writes ESXi seSparse extents and their descriptors for tests (nothing in hypersdk writes them).

seSparse is undocumented; this follows the layout qemu reads (block/vmdk.c, read-only since
qemu 4.1: ``vmdk_open_se_sparse``, ``check_se_sparse_const_header``,
``check_se_sparse_volatile_header``, ``get_cluster_offset``). All offsets and sizes in the
headers count 512-byte sectors; every number is a little-endian u64.

What qemu 7.2 checks, and so what a generated file must get right:

* const header (sector 0, 512 bytes): magic 0xcafebabe, version 0x200000001, grain_size 8
  (4 KiB grains), grain_table_size 64 (32 KiB tables of 4096 entries), flags 0, reserved1..4 0,
  the 304 padding bytes 0. ``capacity`` is the extent's size: qemu takes it from here, not from
  the descriptor's extent line.
* volatile header (at volatile_header_offset): magic 0xcafecafe, replay_journal 0 (else "Image
  is dirty, Replaying journal not supported"), the 480 padding bytes 0.
* grain directory (grain_dir_offset, grain_dir_size sectors of u64 entries; qemu reads all of
  them, so it may cover more than the capacity, as ESXi's does): 0 = no grain table, else the
  top 32 bits must be exactly 0x10000000 and the low 32 bits number the table, which lies at
  ``grain_tables_offset + number * 64``.
* grain table entries, type in the top nibble: 0x0 unallocated (the whole entry must be 0;
  reads through to the parent), 0x1 unmapped and 0x2 zero (both read as zeros; qemu ignores the
  low bits, and ESXi may leave the old cluster number in an unmapped entry), 0x3 allocated: the
  cluster number ``c`` is stored as ``(c & 0xfff) << 48 | c >> 12`` and the grain lies at sector
  ``grains_offset + c * 8``. Any other type is an error.

qemu does not look at the journal, free bitmap or backmap regions, nor at the volatile header's
free_gt_number / next_txn_seq_number; they are laid out here in ESXi's order (const header,
volatile header, journal header, journal, grain directory, grain tables, free bitmap, backmap,
grains) with plausible sizes and left zero.

Through a descriptor, qemu-img also needs: ``CID=`` before ``parentCID=`` (it takes the first
"CID" in the text), ``parentFileNameHint="name"`` with no blanks around ``=`` (it skips exactly
``parentFileNameHint="``), an ``RW`` extent line (others are skipped), and a parent that is a
VMDK whose CID equals our parentCID: qemu opens the hint as format vmdk, and refuses to read
through to a parent that is not a VMDK or whose CID differs (``vmdk_is_cid_valid``).
"""

from __future__ import annotations

import os
import random
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
GRAIN = 4096  # grain_size 8 sectors
GT_ENTRIES = 4096  # grain_table_size 64 sectors of u64
GT_BYTES = GT_ENTRIES * 8
GT_COVERAGE = GRAIN * GT_ENTRIES  # 16 MiB of guest per grain table

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x200000001

CONST_FIELDS = (
    "magic",
    "version",
    "capacity",
    "grain_size",
    "grain_table_size",
    "flags",
    "reserved1",
    "reserved2",
    "reserved3",
    "reserved4",
    "volatile_header_offset",
    "volatile_header_size",
    "journal_header_offset",
    "journal_header_size",
    "journal_offset",
    "journal_size",
    "grain_dir_offset",
    "grain_dir_size",
    "grain_tables_offset",
    "grain_tables_size",
    "free_bitmap_offset",
    "free_bitmap_size",
    "backmap_offset",
    "backmap_size",
    "grains_offset",
    "grains_size",
)
VOLATILE_FIELDS = ("magic", "free_gt_number", "next_txn_seq_number", "replay_journal")

TYPE_UNMAPPED = 0x1 << 60
TYPE_ZERO = 0x2 << 60
TYPE_ALLOCATED = 0x3 << 60
GD_ALLOCATED = 0x1 << 60

ZERO = "zero"
UNMAPPED = "unmapped"
Grain = bytes | str  # allocated contents (<= 4 KiB, zero-padded), ZERO or UNMAPPED


def encode_allocated(cluster: int) -> int:
    """The grain table entry of an allocated grain stored in cluster ``cluster``."""
    return TYPE_ALLOCATED | (cluster & 0xFFF) << 48 | cluster >> 12


@dataclass
class SeSparseFile:
    """Where the generator put things: byte offsets, for tests that corrupt a file on purpose."""

    path: Path
    capacity: int  # bytes
    header: dict[str, int]
    volatile: dict[str, int]
    gd_offset: int
    gt_offset: int  # grain tables region
    grains_offset: int
    gd: dict[int, int] = field(default_factory=dict)  # GD index -> table number
    clusters: dict[int, int] = field(default_factory=dict)  # grain -> cluster number
    size: int = 0

    def gt_entry_offset(self, grain: int) -> int:
        """Byte offset of the grain table entry of ``grain`` (its table must exist)."""
        table = self.gd[grain // GT_ENTRIES]
        return self.gt_offset + table * GT_BYTES + (grain % GT_ENTRIES) * 8

    def patch(self, offset: int, value: int, fmt: str = "<Q") -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(fmt, value))


def _sectors(nbytes: int) -> int:
    return -(-nbytes // SECTOR)


def write_sesparse(
    path: str | os.PathLike,
    capacity: int,
    grains: Mapping[int, Grain],
    *,
    seed: int = 0,
    contiguous: bool = False,
    gd_entries: int | None = None,
    header: Mapping[str, int] | None = None,
    volatile: Mapping[str, int] | None = None,
    reserve: bool = True,
    first_cluster: int = 0,
) -> SeSparseFile:
    """Write an seSparse extent of ``capacity`` bytes (a multiple of 512) holding ``grains``
    (grain number -> contents, ZERO or UNMAPPED; absent grains are unallocated).

    Grain tables and clusters are handed out in a shuffled order (``seed``), as ESXi hands them
    out in the order the guest first writes, unless ``contiguous``. ``gd_entries`` sizes the
    grain directory (default: what the capacity needs, rounded up to a sector). ``header`` and
    ``volatile`` override fields after layout, for hostile files. ``reserve``: size the grain
    tables, free bitmap and backmap regions for the whole directory and capacity (as a real
    extent, we believe); without it they hold only what is used, which keeps the file of a
    64 TiB extent small. ``first_cluster`` numbers the clusters from there (a gap left by
    freed grains), so that cluster numbers use both halves of the split encoding (>= 4096).
    The file is sparse.
    """
    if capacity <= 0 or capacity % SECTOR:
        raise ValueError("capacity must be a positive multiple of 512")
    rng = random.Random(seed)
    n_grains = -(-capacity // GRAIN)
    need_gd = -(-n_grains // GT_ENTRIES)
    gd_entries = gd_entries or -(-need_gd // 64) * 64
    used = sorted(g for g in grains if 0 <= g < n_grains)
    if len(used) != len(grains):
        raise ValueError("grain number outside the capacity")
    tables = sorted({g // GT_ENTRIES for g in used})
    allocated = [g for g in used if isinstance(grains[g], bytes)]
    max_tables = gd_entries if reserve else len(tables)
    map_grains = n_grains if reserve else len(allocated)

    # ESXi order; journal sizes are arbitrary (qemu reads neither)
    h = dict.fromkeys(CONST_FIELDS, 0)
    h.update(magic=CONST_MAGIC, version=VERSION, capacity=capacity // SECTOR)
    h.update(grain_size=GRAIN // SECTOR, grain_table_size=GT_BYTES // SECTOR)
    h.update(volatile_header_offset=1, volatile_header_size=1)
    h.update(journal_header_offset=2, journal_header_size=2, journal_offset=4, journal_size=16)
    h["grain_dir_offset"] = 20
    h["grain_dir_size"] = _sectors(gd_entries * 8)
    h["grain_tables_offset"] = h["grain_dir_offset"] + h["grain_dir_size"]
    h["grain_tables_size"] = max_tables * (GT_BYTES // SECTOR)
    h["free_bitmap_offset"] = h["grain_tables_offset"] + h["grain_tables_size"]
    h["free_bitmap_size"] = _sectors(-(-map_grains // 8))
    h["backmap_offset"] = h["free_bitmap_offset"] + h["free_bitmap_size"]
    h["backmap_size"] = _sectors(map_grains * 8)
    grains_start = h["backmap_offset"] + h["backmap_size"]
    h["grains_offset"] = -(-grains_start // 8) * 8  # 4 KiB aligned
    h["grains_size"] = max(map_grains, first_cluster + len(allocated)) * (GRAIN // SECTOR)

    order = list(range(len(tables)))
    cl_order = list(range(len(allocated)))
    if not contiguous:
        rng.shuffle(order)
        rng.shuffle(cl_order)
    gd = {t: order[i] for i, t in enumerate(tables)}
    clusters = {g: first_cluster + cl_order[i] for i, g in enumerate(allocated)}

    v = dict.fromkeys(VOLATILE_FIELDS, 0)
    v.update(magic=VOLATILE_MAGIC, free_gt_number=len(tables), next_txn_seq_number=1)
    out = SeSparseFile(
        Path(path),
        capacity,
        {**h, **(header or {})},  # overrides change the header only, not where things go
        {**v, **(volatile or {})},
        gd_offset=h["grain_dir_offset"] * SECTOR,
        gt_offset=h["grain_tables_offset"] * SECTOR,
        grains_offset=h["grains_offset"] * SECTOR,
        gd=gd,
        clusters=clusters,
    )
    gt_bytes: dict[int, bytearray] = {gd[t]: bytearray(GT_BYTES) for t in tables}
    for g in used:
        content = grains[g]
        if isinstance(content, bytes):
            entry = encode_allocated(clusters[g])
        elif content == ZERO:
            entry = TYPE_ZERO
        elif content == UNMAPPED:  # keeps a stale cluster number, as ESXi may
            entry = TYPE_UNMAPPED | rng.randrange(1, 1 << 40)
        else:
            raise ValueError(f"grain {g}: {content!r}")
        struct.pack_into("<Q", gt_bytes[gd[g // GT_ENTRIES]], (g % GT_ENTRIES) * 8, entry)

    end = out.grains_offset + (first_cluster + len(allocated)) * GRAIN
    with open(path, "wb") as f:
        const = struct.pack(f"<{len(CONST_FIELDS)}Q", *(out.header[k] for k in CONST_FIELDS))
        f.write(const.ljust(SECTOR, b"\0"))
        f.write(
            struct.pack("<4Q", *(out.volatile[k] for k in VOLATILE_FIELDS)).ljust(SECTOR, b"\0")
        )
        for t in tables:
            f.seek(out.gd_offset + t * 8)
            f.write(struct.pack("<Q", GD_ALLOCATED | gd[t]))
        for number, table in gt_bytes.items():
            f.seek(out.gt_offset + number * GT_BYTES)
            f.write(table)
        for g in allocated:
            f.seek(out.grains_offset + clusters[g] * GRAIN)
            f.write(grains[g].ljust(GRAIN, b"\0")[:GRAIN])  # type: ignore[union-attr]
        f.truncate(max(end, out.grains_offset))
    out.size = os.path.getsize(path)
    return out


def write_descriptor(
    path: str | os.PathLike,
    extent_name: str,
    capacity: int,
    *,
    parent_hint: str | None = None,
    parent_cid: int | None = None,
    cid: int = 0x5E5AA5E0,
) -> Path:
    """An ESXi-style seSparse descriptor naming ``extent_name`` (and a parent, if given)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid if parent_cid is not None else 0xFFFFFFFF:08x}",
        'createType="seSparse"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += [
        "# Extent description",
        f'RW {capacity // SECTOR} SESPARSE "{extent_name}"',
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.grain = "8"',
        'ddb.longContentID = "0123456789abcdef0123456789abcdef"',
        'ddb.virtualHWVersion = "14"',
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return Path(path)


def vmdk_cid(path: str | os.PathLike) -> int:
    """The CID in a monolithicSparse VMDK's embedded descriptor (qemu-img made it)."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    m = re.search(rb"(?m)^CID=([0-9a-fA-F]+)", head)
    if m is None:
        raise ValueError(f"{path}: no CID in the embedded descriptor")
    return int(m.group(1), 16)


def make_snapshot(
    directory: str | os.PathLike,
    capacity: int,
    grains: Mapping[int, Grain],
    *,
    parent: str | os.PathLike | None = None,
    name: str = "vm-000001",
    cid: int = 0x5E5AA5E0,
    hint: str | None = None,
    **kwargs,
) -> tuple[Path, SeSparseFile]:
    """A descriptor ``<name>.vmdk`` (CID ``cid``) + extent ``<name>-sesparse.vmdk`` in
    ``directory``; the parent, if given, is a VMDK (its CID becomes our parentCID) named by
    ``hint``, by default its bare name (it should then lie in the same directory)."""
    d = Path(directory)
    ext = write_sesparse(d / f"{name}-sesparse.vmdk", capacity, grains, **kwargs)
    parent_cid = None
    if parent is not None:
        hint, parent_cid = hint or Path(parent).name, vmdk_cid(parent)
    desc = write_descriptor(
        d / f"{name}.vmdk",
        ext.path.name,
        capacity,
        parent_hint=hint,
        parent_cid=parent_cid,
        cid=cid,
    )
    return desc, ext
