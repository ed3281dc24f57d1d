"""Seed images for the fuzz campaign: small valid images of every format read here, and where
their structures lie.

Made by our own writers (raw, qcow2 v2/v3/compressed/with a backing file, VMDK monolithicSparse,
streamOptimized and monolithicFlat, VHD fixed and dynamic, VHDX, VDI, OVA) and by qemu-img where
it writes what we only read (Parallels, qcow2 with internal snapshots), plus an seSparse extent
(tests/sesparse_gen.py) and a VHDX with a log to replay. Data is spread so tables are
non-trivial: several L2 tables and grain tables, a few blocks of the block formats, zero runs.

Seeds are byte-for-byte reproducible where we write them (UUIDs, CIDs and timestamps are drawn
from a seeded generator while they are made), so a campaign seed names the same cases on every
machine; qemu-img's snapshot dates are zeroed for the same reason.

Each seed lists its structural ``regions`` (offset, length) in the file the mutators change:
headers, tables, descriptors (``regions.py``). Mutators aim most of their work there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

from hypersdk.convert import convert_file
from hypersdk.extents import Extent, ExtentMap
from tests.fuzz.regions import (
    ova_regions,
    parallels_regions,
    qcow2_regions,
    sesparse_regions,
    tar_members,
    text_regions,
    vdi_regions,
    vhd_regions,
    vhdx_regions,
    vmdk_sparse_regions,
)

KiB, MiB = 1 << 10, 1 << 20
MANIFEST = "seeds.json"


@dataclass
class Seed:
    """One seed: a directory of files, the one opened and the one mutated (usually the same:
    an seSparse extent is mutated and its descriptor opened)."""

    name: str
    fmt: str  # the format the seed probes as
    dir: str  # relative to the seeds root
    open: str  # file name opened by the oracle
    mutate: str  # file name the mutators change
    endian: str  # "<" or ">": integer fields of the format
    regions: list[tuple[int, int]]  # structural (offset, length) in the mutated file
    units: list[int] = field(default_factory=lambda: [512])  # sector, cluster, block sizes
    fixups: list[str] = field(default_factory=list)  # checksums redone after a mutation
    text: list[tuple[int, int]] = field(default_factory=list)  # text regions (descriptors)
    word: int = 4  # bytes of a table entry (qcow2, VHDX, seSparse: 8)
    weight: float = 1.0


# ----------------------------------------------------------------------- guest content
def _text(rng: random.Random, n: int) -> bytes:
    words = b"kernel systemd disk mount ext4 journal cache error GET 200 404 root".split()
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + b"\n"
    return bytes(out[:n])


def _content(rng: random.Random, size: int, zones: list[tuple[int, int]], pieces: int) -> bytes:
    """``size`` bytes, zeros but for ``pieces`` runs of random, text or patterned data placed
    in ``zones`` (start, end): some 4 KiB aligned, some not, some as long as 100 KiB."""
    buf = bytearray(size)
    for _ in range(pieces):
        lo, hi = rng.choice(zones)
        length = rng.choice([512, 4 * KiB, 5000, 16 * KiB, 64 * KiB, 100 * KiB])
        at = rng.randrange(lo, max(lo + 1, hi - length))
        if rng.random() < 0.7:
            at -= at % (4 * KiB)
        kind = rng.random()
        if kind < 0.4:
            data = rng.randbytes(length)
        elif kind < 0.8:
            data = _text(rng, length)
        else:
            data = bytes([rng.randrange(1, 256)]) * length
        buf[at : at + length] = data[: size - at]
    return bytes(buf)


@functools.lru_cache(maxsize=1)
def spread(seed: int) -> bytes:
    """64 MiB with ~1.5 MiB of data scattered over it: many L2 and grain tables (for the
    cluster formats only: a block format would store each touched 1-2 MiB block whole)."""
    rng = random.Random(seed)
    return _content(rng, 64 * MiB, [(0, 64 * MiB), (0, 2 * MiB), (40 * MiB, 42 * MiB)], 48)


@functools.lru_cache(maxsize=1)
def dense(seed: int) -> bytes:
    """8 MiB, data in the first and last 2 MiB: a few blocks of the block formats."""
    rng = random.Random(seed)
    return _content(rng, 8 * MiB, [(0, 2 * MiB), (6 * MiB, 8 * MiB)], 24)


@functools.lru_cache(maxsize=1)
def small(seed: int) -> bytes:
    """2 MiB (fixed VHD, raw, OVA, flat VMDK: files as large as the disk)."""
    rng = random.Random(seed)
    return _content(rng, 2 * MiB, [(0, 2 * MiB)], 12)


# ----------------------------------------------------------------- reproducible writers
@contextlib.contextmanager
def reproducible(seed: int | str) -> Iterator[None]:
    """UUIDs, CIDs (os.urandom) and timestamps drawn from ``seed`` while a seed is written."""
    rng = random.Random(seed)
    with (
        mock.patch("uuid.uuid4", lambda: uuid.UUID(int=rng.getrandbits(128), version=4)),
        mock.patch("os.urandom", lambda n: rng.randbytes(n)),
        mock.patch("time.time", lambda: 1_700_000_000.0),
    ):
        yield


def _raw(path: Path, data: bytes) -> Path:
    """A sparse raw file of ``data`` (zero 64 KiB blocks left as holes)."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        for at in range(0, len(data), 64 * KiB):
            block = data[at : at + 64 * KiB]
            if block.strip(b"\0"):
                f.seek(at)
                f.write(block)
    return path


def _convert(src: Path, dst: Path, fmt: str, options: dict[str, str] | None = None) -> Path:
    convert_file(src, dst, fmt, src_fmt="raw", options=options, cache="unsafe")
    return dst


class _Bytes:
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def _qemu(*args: str) -> None:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"qemu-img {' '.join(args)}: {res.stderr.strip()}")


def qemu_available() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


# --------------------------------------------------------------------- qemu-img seeds
def zero_snapshot_dates(path: Path) -> None:
    """qemu-img stamps snapshots with the time: zero it, so the seed is reproducible."""
    data = bytearray(path.read_bytes())
    nsnap, snap_off = struct.unpack_from(">IQ", data, 60)
    pos = snap_off
    for _ in range(nsnap):
        _, _, id_size, name_size, *_, extra = struct.unpack_from(">QIHHIIQII", data, pos)
        struct.pack_into(">IIQ", data, pos + 16, 0, 0, 0)  # date_sec, date_nsec, vm_clock
        end = pos + 40 + extra + id_size + name_size
        pos = end + (-end % 8)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- the builders
def _vhdx_log_entry(guid: bytes, seq: int, ops: list, flushed: int, last: int) -> bytes:
    """One VHDX log entry: ops are (file offset, 4 KiB) writes or (file offset, length)
    zeroings (the layout tests/test_format_vhdx.py replays against qemu)."""
    from hypersdk.formats import _vhdx_layout as VL

    descs, sectors = b"", b""
    for off, op in ops:
        if isinstance(op, int):
            descs += struct.pack("<4sIQQQ", b"zero", 0, op, off, seq)
        else:
            descs += struct.pack("<4sIQQQ", b"desc", struct.unpack_from("<I", op, 4092)[0],
                                 struct.unpack_from("<Q", op)[0], off, seq)  # fmt: skip
            sectors += struct.pack("<4sI", b"data", seq >> 32) + op[8:4092]
            sectors += struct.pack("<I", seq & 0xFFFFFFFF)
    length = 4096 + len(sectors)
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, 0, seq, len(ops), 0, guid,
                       flushed, last)  # fmt: skip
    entry = bytearray((head + descs).ljust(4096, b"\0") + sectors)
    struct.pack_into("<I", entry, 4, VL.crc32c(bytes(entry)))
    return bytes(entry)


def _dirty_vhdx(clean: bytes, rng: random.Random) -> bytes:
    """``clean`` (ours: blocks of 1 MiB, BAT at 3 MiB) with a pending log of one entry that
    writes a data sector, allocates a new block past the end and zeroes a sector."""
    from hypersdk.formats import _vhdx_layout as VL

    data = bytearray(clean)
    new = len(data)
    data += bytes(MiB)
    bat = bytearray(data[3 * MiB : 3 * MiB + 4096])
    struct.pack_into("<Q", bat, 2 * 8, new | VL.FULLY_PRESENT)  # block 2 -> the new space
    guid = uuid.UUID(int=rng.getrandbits(128)).bytes_le
    ops = [(4 * MiB, rng.randbytes(4096)), (3 * MiB, bytes(bat)), (new, b"N" * 4096),
           (4 * MiB + 8192, 4096)]  # fmt: skip
    entry = _vhdx_log_entry(guid, 7, ops, flushed=len(data), last=len(data))
    data[MiB : MiB + len(entry)] = entry
    for off in VL.HEADER_OFFSETS:
        data[off + 48 : off + 64] = guid
        data[off : off + VL.HEADER_SIZE] = VL.seal(bytearray(data[off : off + VL.HEADER_SIZE]))
    return bytes(data)


Builder = Callable[[Path, int], Seed]


def _one(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _plain(
    name: str, fmt: str, source: Callable[[int], bytes], out: str, options: dict, endian: str
) -> Builder:
    regions_of = {
        "qcow2": lambda b: qcow2_regions(b),
        "vmdk": lambda b: (vmdk_sparse_regions(b), [512, 64 * KiB]),
        "vhd": lambda b: (vhd_regions(b), [512, 2 * MiB]),
        "vhdx": lambda b: (vhdx_regions(b), [512, MiB]),
        "vdi": lambda b: (vdi_regions(b), [512, MiB]),
        "raw": lambda b: ([(0, 64 * KiB)], [512]),
    }[fmt]

    def build(root: Path, seed: int) -> Seed:
        d = _one(root, name)
        src = _raw(d / "source.raw", source(seed))
        dst = d / out
        if fmt == "raw":
            os.replace(src, dst)
        else:
            _convert(src, dst, fmt, options)
            src.unlink()
        regions, units = regions_of(dst.read_bytes())
        fixups = {"vhd": ["vhd"], "vhdx": ["vhdx"]}.get(fmt, [])
        return Seed(name, fmt, name, out, out, endian, regions, units, fixups,
                    weight=0.3 if fmt == "raw" else 1.0)  # fmt: skip

    return build


def _qcow2_backing(root: Path, seed: int) -> Seed:
    """A v3 overlay (4 KiB clusters: data, zero clusters, holes reading through) over a base
    qcow2 in the same directory."""
    from hypersdk.atomic import atomic_file
    from hypersdk.formats import get_driver

    d = _one(root, "qcow2-backing")
    size = 8 * MiB
    base = dense(seed)
    new = bytearray(base)
    rng = random.Random(seed + 1)
    extents = []
    for _ in range(12):
        at, n = rng.randrange(0, size - 64 * KiB) // 512 * 512, rng.choice([512, 4 * KiB, 40 * KiB])
        if rng.random() < 0.3:
            new[at : at + n] = bytes(n)
            extents.append(Extent(at, n, zero=True))
        else:
            new[at : at + n] = rng.randbytes(n)
            extents.append(Extent(at, n))
    driver = get_driver("qcow2")
    plans = (
        ("base.qcow2", base, ExtentMap.full(size), {"cluster_size": "65536"}),
        ("overlay.qcow2", bytes(new), ExtentMap(size, extents),
         {"cluster_size": "4096", "backing_file": "base.qcow2", "backing_format": "qcow2"}),
    )  # fmt: skip
    for fname, content, em, opts in plans:
        layout = driver.plan(size, em, opts)
        with atomic_file(d / fname, "unsafe") as sink:
            driver.write(_Bytes(content), layout, sink)
    regions, units = qcow2_regions((d / "overlay.qcow2").read_bytes())
    return Seed("qcow2-backing", "qcow2", d.name, "overlay.qcow2", "overlay.qcow2", ">",
                regions, units)  # fmt: skip


def _qcow2_snapshots(root: Path, seed: int) -> Seed:
    """qemu-img's: two internal snapshots with writes between them (shared L2 tables, copied
    clusters, a snapshot table)."""
    d = _one(root, "qcow2-snapshots")
    src = _raw(d / "source.raw", dense(seed))
    img = d / "snap.qcow2"
    _qemu("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    src.unlink()
    _qemu("snapshot", "-c", "first", str(img))
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 64k", "-c", "write -z 6M 8k", str(img)]
    res = subprocess.run(io, capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"qemu-io: {res.stderr.strip()}")
    _qemu("snapshot", "-c", "second", str(img))
    zero_snapshot_dates(img)
    regions, units = qcow2_regions(img.read_bytes())
    return Seed("qcow2-snapshots", "qcow2", d.name, img.name, img.name, ">", regions, units)


def _parallels(root: Path, seed: int) -> Seed:
    d = _one(root, "parallels")
    src = _raw(d / "source.raw", dense(seed))
    img = d / "disk.hds"
    _qemu("convert", "-f", "raw", "-O", "parallels", "-o", "cluster_size=64k", str(src), str(img))
    src.unlink()
    return Seed("parallels", "parallels", d.name, img.name, img.name, "<",
                parallels_regions(img.read_bytes()), [512, 64 * KiB])  # fmt: skip


def _vmdk_flat(root: Path, seed: int) -> Seed:
    d = _one(root, "vmdk-flat")
    src = _raw(d / "source.raw", small(seed))
    _convert(src, d / "disk.vmdk", "vmdk", {"subformat": "monolithicFlat"})
    src.unlink()
    name = "disk-descriptor.vmdk"
    text = (d / name).read_bytes()
    return Seed("vmdk-flat", "vmdk", d.name, name, name, "<",
                text_regions(text), text=text_regions(text))  # fmt: skip


def _vmdk_sesparse(root: Path, seed: int) -> Seed:
    """An ESXi snapshot: descriptor + seSparse extent over a monolithicSparse parent; the
    extent is mutated (the descriptor's text is the vmdk-flat seed's business)."""
    from tests import sesparse_gen as S

    d = _one(root, "vmdk-sesparse")
    size = 32 * MiB
    src = _raw(d / "source.raw", spread(seed)[:size])
    _convert(src, d / "parent.vmdk", "vmdk", {"subformat": "monolithicSparse"})
    src.unlink()
    rng = random.Random(seed)
    grains: dict[int, S.Grain] = {}
    for _ in range(60):
        g = rng.randrange(size // S.GRAIN)
        grains[g] = rng.choice([S.ZERO, S.UNMAPPED, rng.randbytes(rng.choice([100, 4096]))])
    desc, ext = S.make_snapshot(d, size, grains, parent=d / "parent.vmdk", seed=seed,
                                reserve=False, first_cluster=4090)  # fmt: skip
    return Seed("vmdk-sesparse", "vmdk", d.name, desc.name, ext.path.name, "<",
                sesparse_regions(ext), [512, 4096])  # fmt: skip


def _vhdx_log(root: Path, seed: int) -> Seed:
    d = _one(root, "vhdx-log")
    src = _raw(d / "source.raw", dense(seed))
    _convert(src, d / "clean.vhdx", "vhdx", {"block_size": "1M"})
    src.unlink()
    dirty = _dirty_vhdx((d / "clean.vhdx").read_bytes(), random.Random(seed))
    (d / "clean.vhdx").unlink()
    (d / "dirty.vhdx").write_bytes(dirty)
    return Seed("vhdx-log", "vhdx", d.name, "dirty.vhdx", "dirty.vhdx", "<",
                vhdx_regions(dirty), [512, MiB], ["vhdx", "vhdx-log"])  # fmt: skip


def _ova(root: Path, seed: int) -> Seed:
    d = _one(root, "ova")
    src = _raw(d / "source.raw", small(seed))
    _convert(src, d / "vm.ova", "ova")
    src.unlink()
    regions, text = ova_regions((d / "vm.ova").read_bytes())
    return Seed("ova", "ova", d.name, "vm.ova", "vm.ova", "<", regions, [512, 64 * KiB],
                ["tar"], text)  # fmt: skip


def _ova_pax(root: Path, seed: int) -> Seed:
    """Member names of 114 characters: pax extended headers before each member."""
    d = _one(root, "ova-pax")
    src = _raw(d / "source.raw", small(seed))
    _convert(src, d / "vm.ova", "ova", {"name": "v" * 110})
    src.unlink()
    regions, text = ova_regions((d / "vm.ova").read_bytes())
    return Seed("ova-pax", "ova", d.name, "vm.ova", "vm.ova", "<", regions, [512, 64 * KiB],
                ["tar"], text)  # fmt: skip


def _ova_qcow2(root: Path, seed: int) -> Seed:
    """An OVA whose OVF declares a qcow2 disk (oVirt's format URL): the qcow2 reader over a
    tar member, where a backing file name may not reach any file."""
    from tests.packages import QCOW2_URL, make_ova, one_disk_ovf

    d = _one(root, "ova-qcow2")
    data = small(seed)
    src = _raw(d / "source.raw", data)
    disk = _convert(src, d / "disk.qcow2", "qcow2", {"cluster_size": "4096"})
    src.unlink()
    ovf = one_disk_ovf("disk.qcow2", len(data), QCOW2_URL)
    make_ova(d / "vm.ova", [("vm.ovf", ovf), ("disk.qcow2", disk.read_bytes())])
    disk.unlink()
    blob = (d / "vm.ova").read_bytes()
    regions, text = [], []
    for pos, name, size, _ in tar_members(blob):
        regions.append((pos, 512))
        text.append((pos + 124, 12))
        if name.endswith(".ovf"):
            text.append((pos + 512, size))
        else:
            inner, _ = qcow2_regions(blob[pos + 512 : pos + 512 + size])
            regions += [(pos + 512 + a, n) for a, n in inner]
    return Seed("ova-qcow2", "ova", d.name, "vm.ova", "vm.ova", ">", regions + text,
                [512, 4096], ["tar"], text)  # fmt: skip


BUILDERS: dict[str, Builder] = {
    "raw": _plain("raw", "raw", small, "disk.raw", {}, "<"),
    "qcow2-v3": _plain("qcow2-v3", "qcow2", spread, "disk.qcow2",
                       {"cluster_size": "4096", "compat": "1.1"}, ">"),
    "qcow2-v2": _plain("qcow2-v2", "qcow2", spread, "disk.qcow2",
                       {"cluster_size": "65536", "compat": "0.10"}, ">"),
    "qcow2-zlib": _plain("qcow2-zlib", "qcow2", spread, "disk.qcow2",
                         {"cluster_size": "16384", "compression": "zlib"}, ">"),
    "qcow2-backing": _qcow2_backing,
    "qcow2-snapshots": _qcow2_snapshots,
    "vmdk-sparse": _plain("vmdk-sparse", "vmdk", spread, "disk.vmdk",
                          {"subformat": "monolithicSparse"}, "<"),
    "vmdk-stream": _plain("vmdk-stream", "vmdk", spread, "disk.vmdk",
                          {"subformat": "streamOptimized"}, "<"),
    "vmdk-flat": _vmdk_flat,
    "vmdk-sesparse": _vmdk_sesparse,
    "vhd-fixed": _plain("vhd-fixed", "vhd", small, "disk.vhd", {"subformat": "fixed"}, ">"),
    "vhd-dynamic": _plain("vhd-dynamic", "vhd", dense, "disk.vhd", {"subformat": "dynamic"}, ">"),
    "vhdx": _plain("vhdx", "vhdx", dense, "disk.vhdx", {"block_size": "1M"}, "<"),
    "vhdx-log": _vhdx_log,
    "vdi": _plain("vdi", "vdi", dense, "disk.vdi", {}, "<"),
    "vdi-static": _plain("vdi-static", "vdi", small, "disk.vdi", {"subformat": "static"}, "<"),
    "parallels": _parallels,
    "ova": _ova,
    "ova-pax": _ova_pax,
    "ova-qcow2": _ova_qcow2,
}  # fmt: skip
NEEDS_QEMU = {"qcow2-snapshots", "parallels"}


def selected(names: list[str] | None) -> list[str]:
    """Seed names matching ``names`` (a seed name, or a format: "qcow2" selects every qcow2
    seed); all by default."""
    if not names:
        return list(BUILDERS)
    out = [n for n in BUILDERS if any(n == w or n.split("-")[0] == w for w in names)]
    if not out:
        raise ValueError(f"no seed matches {names} (seeds: {', '.join(BUILDERS)})")
    return out


def build(root: str | os.PathLike, seed: int = 1, names: list[str] | None = None) -> list[Seed]:
    """Write the seeds under ``root`` (qemu-made ones only when qemu-img and qemu-io are
    installed) and their manifest; returns them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seeds = []
    for name in selected(names):
        if name in NEEDS_QEMU and not qemu_available():
            continue
        with reproducible(f"{seed}/{name}"):  # each seed alone: a subset builds the same
            made = BUILDERS[name](root, seed)
            wide = made.fmt in ("qcow2", "vhdx") or name in ("vmdk-sesparse", "ova-qcow2")
            made.word = 8 if wide else 4
            seeds.append(made)
    for source in (spread, dense, small):
        source.cache_clear()
    (root / MANIFEST).write_text(json.dumps([asdict(s) for s in seeds], indent=1))
    return seeds


def view(root: Path, names: list[str], into: Path) -> Path:
    """A seeds root holding only the seeds ``names`` select (links to ``root``'s)."""
    wanted = set(selected(names))
    chosen = [s for s in load(root) if s.name in wanted]
    into.mkdir(parents=True, exist_ok=True)
    for s in chosen:
        (into / s.dir).symlink_to((root / s.dir).resolve(), target_is_directory=True)
    (into / MANIFEST).write_text(json.dumps([asdict(s) for s in chosen], indent=1))
    return into


def load(root: str | os.PathLike) -> list[Seed]:
    raw = json.loads((Path(root) / MANIFEST).read_text())
    return [
        Seed(**{**s, "regions": [tuple(r) for r in s["regions"]],
                "text": [tuple(r) for r in s["text"]]})
        for s in raw
    ]  # fmt: skip


def digest(root: str | os.PathLike, seeds: list[Seed]) -> str:
    """A short hash of every seed's mutated file: equal digests, equal cases."""
    import hashlib

    h = hashlib.sha256()
    for s in seeds:
        h.update(s.name.encode())
        h.update((Path(root) / s.dir / s.mutate).read_bytes())
    return h.hexdigest()[:16]


def seed_bytes(root: str | os.PathLike, s: Seed) -> bytes:
    return (Path(root) / s.dir / s.mutate).read_bytes()


__all__ = ["BUILDERS", "Seed", "build", "digest", "load", "seed_bytes", "selected", "view"]
