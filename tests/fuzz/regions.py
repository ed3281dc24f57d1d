"""Where a seed's structures lie: (offset, length) regions of headers, tables, descriptors.

Found by parsing the seed with struct here, not with our readers, so a reader bug cannot hide
a region. The mutators aim most of their work at these regions.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

KiB, MiB = 1 << 10, 1 << 20
Regions = list[tuple[int, int]]


def _u(data: bytes, fmt: str, at: int) -> tuple:
    return struct.unpack_from(fmt, data, at)


def qcow2_regions(data: bytes) -> tuple[Regions, list[int]]:
    """Header and extensions, L1, refcount table and blocks, L2 tables, snapshot table and
    the snapshots' L1 tables."""
    (_, _, bf_off, bf_size, cbits, _, _, l1_size, l1_off, rt_off, rt_clusters, nsnap,
     snap_off) = _u(data, ">4sIQIIQIIQQIIQ", 0)  # fmt: skip
    cs = 1 << cbits
    regions = [(0, 112), (112, 512)]
    if bf_off:
        regions.append((bf_off, bf_size))
    regions.append((l1_off, l1_size * 8))
    regions.append((rt_off, min(rt_clusters * cs, 4 * KiB)))
    for (entry,) in struct.iter_unpack(">Q", data[rt_off : rt_off + rt_clusters * cs]):
        if entry & ~0x1FF:
            regions.append((entry & ~0x1FF, min(cs, 4 * KiB)))
    l1s = [(l1_off, l1_size)]
    pos = snap_off
    for _ in range(nsnap):
        s_l1_off, s_l1_size, id_size, name_size, *_, extra = _u(data, ">QIHHIIQII", pos)
        end = pos + 40 + extra + id_size + name_size
        regions.append((pos, end - pos))
        l1s.append((s_l1_off, s_l1_size))
        regions.append((s_l1_off, s_l1_size * 8))
        pos = end + (-end % 8)
    seen = set()
    for off, n in l1s:
        for (entry,) in struct.iter_unpack(">Q", data[off : off + n * 8]):
            l2 = entry & 0x00FF_FFFF_FFFF_FE00
            if l2 and l2 not in seen:
                seen.add(l2)
                regions.append((l2, cs))
    return regions, [512, cs]


_VMDK = struct.Struct("<IIIQQQQIQQQB4sH")


def vmdk_sparse_regions(data: bytes, base: int = 0) -> Regions:
    """Header, embedded descriptor, (redundant) grain directory and tables; for a
    streamOptimized extent the footer, its markers and the tables behind markers."""
    end = len(data)
    _, _, flags, _, _, d_off, d_size, gtes, rgd, gd, *_ = _VMDK.unpack_from(data, base)
    regions = [(base, 512)]
    if d_off:
        text = data[base + d_off * 512 : base + (d_off + d_size) * 512].split(b"\0", 1)[0]
        regions.append((base + d_off * 512, max(1, len(text))))
    if gd == 0xFFFF_FFFF_FFFF_FFFF:  # streamOptimized: the footer holds the real one
        regions.append((end - 1536, 1536))
        gd = _VMDK.unpack_from(data, end - 1024)[9]
    capacity = _VMDK.unpack_from(data, base)[3]
    grain = _VMDK.unpack_from(data, base)[4] or 128
    n_gt = -(-capacity // grain // max(1, gtes))
    for directory in (gd, rgd if flags & 2 else 0):
        if not directory:
            continue
        at = base + directory * 512
        regions.append((at, n_gt * 4))
        if flags & (1 << 17):
            regions.append((at - 512, 16))  # its metadata marker
        for (entry,) in struct.iter_unpack("<I", data[at : at + n_gt * 4]):
            if entry:
                regions.append((base + entry * 512, gtes * 4))
    return regions


def text_regions(data: bytes) -> Regions:
    return [(0, len(data))]


def vhd_regions(data: bytes) -> Regions:
    regions = [(len(data) - 512, 512)]
    if data[:8] != b"conectix":
        return regions
    (dyn,) = _u(data, ">Q", 16)
    regions += [(0, 512), (dyn, 1024)]
    table, _, entries, _ = _u(data, ">QIII", dyn + 16)
    regions.append((table, entries * 4))
    for (entry,) in struct.iter_unpack(">I", data[table : table + entries * 4]):
        if entry != 0xFFFFFFFF:
            regions.append((entry * 512, 512))  # the block's sector bitmap
    return regions


def vhdx_regions(data: bytes) -> Regions:
    """File identifier, both headers and region tables, the metadata table and items, the BAT
    (as the first region table places them), the log entry if there is one."""
    regions = [(0, 520), (64 * KiB, 80), (128 * KiB, 80)]
    (count,) = _u(data, "<I", 192 * KiB + 8)
    regions += [(192 * KiB, 16 + 32 * count), (256 * KiB, 16 + 32 * count)]
    for i in range(count):
        _, offset, length, _ = _u(data, "<16sQII", 192 * KiB + 16 + 32 * i)
        regions.append((offset, min(length, 4 * KiB)))
    (items,) = _u(data, "<H", 2 * MiB + 10)
    regions += [(2 * MiB, 32 + 32 * items), (2 * MiB + 64 * KiB, 64)]
    if data[MiB : MiB + 4] == b"loge":
        (length,) = _u(data, "<I", MiB + 8)
        regions += [(MiB, 64), (MiB + 64, 32 * 8), (MiB, length)]
    return regions


def vdi_regions(data: bytes) -> Regions:
    bmap, _ = _u(data, "<II", 0x154)
    (blocks,) = _u(data, "<I", 0x180)
    return [(0, 0x1C8), (0x40, 0x40), (0x150, 0x78), (bmap, blocks * 4)]


def parallels_regions(data: bytes) -> Regions:
    (entries,) = _u(data, "<I", 32)
    return [(0, 64), (64, entries * 4)]


def tar_members(data: bytes) -> Iterator[tuple[int, str, int, bytes]]:
    """(header offset, name, size, type) of each member of an (unmutated) tar; a pax
    header's path names the member after it."""
    pos, pending = 0, None
    while pos + 512 <= len(data) and data[pos : pos + 512].strip(b"\0"):
        name = data[pos : pos + 100].split(b"\0", 1)[0].decode()
        size = int(data[pos + 124 : pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = data[pos + 156 : pos + 157]
        if kind == b"x":
            body = data[pos + 512 : pos + 512 + size].decode()
            pending = next((r.split("=", 1)[1] for r in body.split("\n") if "path=" in r), None)
        else:
            name, pending = pending or name, None
        yield pos, name, size, kind
        pos += 512 + -(-size // 512) * 512


def ova_regions(data: bytes) -> tuple[Regions, Regions]:
    """Tar headers, the descriptor and manifest (text), the disk's VMDK structures."""
    regions: Regions = []
    text: Regions = []
    for pos, name, size, kind in tar_members(data):
        regions.append((pos, 512))
        text.append((pos + 124, 12))  # the octal size
        if kind == b"x" or name.endswith((".ovf", ".mf")):
            text.append((pos + 512, size))
        elif name.endswith(".vmdk"):
            disk = data[pos + 512 : pos + 512 + size]
            regions += [(pos + 512 + a, n) for a, n in vmdk_sparse_regions(disk)]
    return regions + text, text


def sesparse_regions(ext) -> Regions:
    """Const and volatile headers, the grain directory, each grain table."""
    regions = [(0, 26 * 8), (512, 32), (ext.gd_offset, max(64, 8 * len(ext.gd)))]
    regions += [(ext.gt_offset + n * 32 * KiB, 32 * KiB) for n in ext.gd.values()]
    return regions
