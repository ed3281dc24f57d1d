"""Hostile VHD, VHDX and VDI headers and tables, and hostile OVF/OVA packages: whatever a
header claims (billions of table entries in a file of holes, every block at the same place, a
log of 16,384 chained entries, an entity bomb, a FIFO, packages nested 200 deep), ``hyperctl
info``/``check``/``convert`` finish in time proportional to the real file, within a 1 GiB
address space, with a result or one FormatError line. Each case runs in a child process
(tests/limited.py)."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest

from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import _vhdx_layout as L
from hypersdk.formats import get_driver
from hypersdk.formats.vhd import DYNAMIC, checksum, make_footer
from hypersdk.io import FileSink
from tests.limited import hyperctl, python, refused, succeeded
from tests.packages import RAW_URL, UNKNOWN_URL, make_ova, one_disk_ovf

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for at, data in pieces.items():
            f.seek(at)
            f.write(data)
    return path


# ------------------------------------------------------------------------------------ VHD
def vhd_file(path: Path, *, vsize: int, block: int, entries: int, size: int, bat: bytes = b""):
    """A dynamic VHD: footer copy, dynamic header, a BAT of ``entries`` at 1536 (``bat`` bytes
    at its start, holes after), ``size`` bytes in all, the footer at the end."""
    footer = make_footer(vsize, DYNAMIC, 512, uuid.uuid4().bytes, 0)
    dyn = bytearray(1024)
    struct.pack_into(">8sQQIIII", dyn, 0, b"cxsparse", 2**64 - 1, 1536, 0x10000, entries, block, 0)
    struct.pack_into(">I", dyn, 36, checksum(dyn, 36))
    return sparse_file(path, size, {0: footer, 512: bytes(dyn), 1536: bat, size - 512: footer})


@pytest.mark.parametrize(
    "block,entries", [(512, 64 * MiB), (2 * MiB, 2040 * 512)], ids=["512B", "2MiB"]
)
def test_vhd_bat_of_holes(tmp_path, block, entries):
    """A 256 MiB file of holes: 64 Mi entries of 512-byte blocks, or 2040 GiB in 2 MiB blocks.
    Entry 0 (a hole) is sector 0: every block would sit over the footer copy, which used to be
    materialised and walked (gigabytes, minutes)."""
    img = vhd_file(
        tmp_path / "holes.vhd", vsize=entries * block, block=block, entries=entries,
        size=256 * MiB + 4096,
    )  # fmt: skip
    for cmd in ("check", "info"):
        refused(hyperctl(cmd, img, timeout=30), str(img), "footer copy", "corrupt")


def test_vhd_every_entry_names_one_block(tmp_path):
    """8 Mi entries all naming the one block after the BAT: more blocks than the file holds."""
    entries = 8 * MiB
    end = 1536 + entries * 4
    bat = np.full(entries, end // 512, dtype=">u4").tobytes()
    img = vhd_file(
        tmp_path / "same.vhd", vsize=entries * 512, block=512, entries=entries,
        size=end + 1024 + 512, bat=bat,
    )  # fmt: skip
    for cmd in ("check", "info"):
        refused(hyperctl(cmd, img, timeout=30), str(img), "share space")


# ------------------------------------------------------------------------------------ VDI
def vdi_file(path: Path, *, blocks: int, data_off: int, size: int, bmap: bytes = b"") -> Path:
    hdr = bytearray(512)
    struct.pack_into(
        "<64sIIIII256sIIIIIIIQIIII16s16s16s16s", hdr, 0, b"<<< hostile >>>\n", 0xBEDA107F,
        0x00010001, 0x180, 1, 0, b"", 512, data_off, 0, 0, 0, 512, 0, blocks * MiB, MiB, 0,
        blocks, 1, uuid.uuid4().bytes_le, bytes(16), bytes(16), bytes(16),
    )  # fmt: skip
    return sparse_file(path, size, {0: bytes(hdr), 512: bmap})


def test_vdi_block_map_of_holes(tmp_path):
    """A 64 TiB disk whose 64 Mi map entries are holes: every guest block names data block 0."""
    blocks = 64 * MiB - 1024
    data_off = 257 * MiB
    img = vdi_file(tmp_path / "holes.vdi", blocks=blocks, data_off=data_off, size=data_off + MiB)
    for cmd in ("check", "info"):
        refused(hyperctl(cmd, img, timeout=30), str(img), "share space")


# ----------------------------------------------------------------------------------- VHDX
def vhdx_file(path: Path, size: int, extents: ExtentMap | None = None, source=None) -> Path:
    """Our writer's dynamic VHDX of ``size`` with 1 MiB blocks (holes where it writes zeros)."""
    driver = get_driver("vhdx")
    layout = driver.plan(size, extents or ExtentMap(size), {"block_size": "1M"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sink = FileSink(fd, str(path))
        driver.write(source, layout, sink)
        sink.finish()
    finally:
        os.close(fd)
    return path


def test_vhdx_huge_empty_bat(tmp_path):
    """64 TiB in 1 MiB blocks: a 512 MiB BAT of holes, read a chunk at a time."""
    img = vhdx_file(tmp_path / "empty.vhdx", 64 * TiB)
    assert os.path.getsize(img) > 512 * MiB
    out = succeeded(hyperctl("info", "--json", img, timeout=60))
    assert '"allocated_blocks": 0' in out and f'"virtual_size": {64 * TiB}' in out
    assert "no errors found" in succeeded(hyperctl("check", img, timeout=60))


class _Ones:
    size = 8 * TiB

    def read(self, offset: int, length: int) -> bytes:
        return b"\x01" * length


def test_vhdx_every_entry_names_one_block(tmp_path):
    """4 Mi BAT entries all FULLY_PRESENT at the one block the writer placed."""
    size = 4 * TiB
    img = vhdx_file(tmp_path / "same.vhdx", size, ExtentMap(size, [Extent(0, MiB)]), _Ones())
    with open(img, "r+b") as f:
        f.seek(3 * MiB)
        first = struct.unpack("<Q", f.read(8))[0]
        assert first & 7 == L.FULLY_PRESENT
        ratio = L.chunk_ratio(MiB, 512)
        entries = L.bat_entries(size // MiB, ratio)
        table = np.full(-(-entries // (ratio + 1)) * (ratio + 1), first, dtype="<u8")
        table.reshape(-1, ratio + 1)[:, ratio] = 0  # the sector-bitmap entries
        f.seek(3 * MiB)
        f.write(table[:entries].tobytes())
    for cmd in ("info", "check"):
        refused(hyperctl(cmd, img, timeout=30), str(img), "share space")


# -------------------------------------------------------------------------------- VHDX log
def _log_entry(guid: bytes, seq: int, tail: int, flushed: int, ops=(), length=0) -> bytes:
    """One log entry: ``ops`` are (file offset, 4 KiB) writes or (file offset, length) zeros
    (as in MS-VHDX 2.3.1)."""
    descs, sectors = b"", b""
    for off, data in ops:
        if isinstance(data, int):
            descs += struct.pack("<4sIQQQ", b"zero", 0, data, off, seq)
            continue
        trailing, leading = struct.unpack_from("<I", data, 4092)[0], struct.unpack("<Q", data[:8])
        descs += struct.pack("<4sIQQQ", b"desc", trailing, leading[0], off, seq)
        sectors += struct.pack("<4sI", b"data", seq >> 32) + data[8:4092]
        sectors += struct.pack("<I", seq & 0xFFFFFFFF)
    length = length or 4096 + len(sectors)
    head = struct.pack(
        "<4sIIIQII16sQQ", b"loge", 0, length, tail, seq, len(ops), 0, guid, flushed, flushed
    )
    entry = bytearray((head + descs).ljust(4096, b"\0") + sectors)
    struct.pack_into("<I", entry, 4, L.crc32c(bytes(entry.ljust(length, b"\0"))))
    return bytes(entry)


def _with_log(img: Path, log: bytes, guid: bytes) -> None:
    """Append ``log`` (MiB-aligned) and point both headers at it with ``guid``."""
    with open(img, "r+b") as f:
        at = -(-f.seek(0, os.SEEK_END) // MiB) * MiB
        f.seek(at)
        f.write(log)
        for off in L.HEADER_OFFSETS:
            f.seek(off)
            hdr = bytearray(f.read(L.HEADER_SIZE))
            hdr[48:64] = guid
            struct.pack_into("<IQ", hdr, 68, len(log), at)
            f.seek(off)
            f.write(L.seal(hdr))


def _sector(n: int) -> bytes:
    return struct.pack("<I", n) * 1024


@pytest.mark.parametrize("kind", ["chain", "claims", "zeros"])
def test_vhdx_log_scan_is_linear(tmp_path, kind):
    """chain: 16,384 chained entries (every 64th writes a sector of block 0); each used to be
    followed to the end from every start. claims: every sector claims an entry as long as the
    whole log (CRC bad), which used to cost a copy and a CRC of the log each. zeros: 16,384
    entries of 126 zeroing descriptors each, 2 million writes that used to be held as Python
    objects (close to 1 GB) and each laid over every read: refused by count."""
    img = vhdx_file(tmp_path / "log.vhdx", 64 * MiB, ExtentMap(64 * MiB, [Extent(0, MiB)]), _Ones())
    with open(img, "rb") as f:
        f.seek(3 * MiB)
        block0 = struct.unpack("<Q", f.read(8))[0] & L.OFFSET_MASK
    fsize = os.path.getsize(img)
    guid = uuid.uuid4().bytes_le
    count, log_size = 16384, 66 * MiB
    log = bytearray(log_size)
    expect = bytearray(b"\x01" * MiB)
    if kind == "chain":
        pos = 0
        for i in range(count):
            ops = [(block0 + (i // 64 % 128) * 4096, _sector(i))] if i % 64 == 0 else []
            entry = _log_entry(guid, i + 1, 0, fsize, ops)
            log[pos : pos + len(entry)] = entry
            pos += len(entry)
            for off, data in ops:
                expect[off - block0 : off - block0 + 4096] = data
    elif kind == "claims":
        claim = _log_entry(guid, 1, 0, fsize, length=log_size)[:4096]
        for pos in range(0, count * 4096, 4096):
            log[pos : pos + 4096] = claim
    else:
        zeros = [(block0 + k % 128 * 4096, 4096) for k in range(126)]
        for i in range(count):
            log[i * 4096 : (i + 1) * 4096] = _log_entry(guid, i + 1, 0, fsize, zeros)
    _with_log(img, bytes(log), guid)
    if kind == "zeros":
        refused(hyperctl("info", img, timeout=30), "replays 2064384 writes")
        return
    out = succeeded(hyperctl("info", "--json", img, timeout=30))
    assert f'"log_entries_replayed": {count if kind == "chain" else 0}' in out
    raw = tmp_path / "out.raw"
    succeeded(hyperctl("convert", "-q", "-t", "unsafe", "-O", "raw", img, raw, timeout=30))
    with open(raw, "rb") as f:
        assert f.read(MiB) == bytes(expect)


# ------------------------------------------------------------------------------ OVF and OVA
_OPEN_PACKAGE = """
import sys
from hypersdk.errors import FormatError
from hypersdk.formats.ova import Package
try:
    with Package(sys.argv[1]) as pkg:
        pkg.open_disk(pkg.disk_files[0]).close()
    print("opened")
except FormatError as exc:
    print("FormatError:", exc)
"""


@pytest.mark.parametrize("which", ["descriptor", "disk"])
def test_ovf_directory_fifo_does_not_hang(tmp_path, which):
    """A FIFO as the .ovf or as a disk href: refused as not a regular file, never waited on."""
    d = tmp_path / "pkg"
    d.mkdir()
    if which == "descriptor":
        os.mkfifo(d / "vm.ovf")
    else:
        (d / "vm.ovf").write_bytes(one_disk_ovf("disk.raw", MiB, RAW_URL))
        os.mkfifo(d / "disk.raw")
    res = python(_OPEN_PACKAGE, d, timeout=20)
    assert res.stdout.startswith("FormatError:") and "not a regular file" in res.stdout, res


def test_ova_utf16_entity_bomb(tmp_path):
    """Billion laughs in a UTF-16 descriptor: refused as a DOCTYPE, before any expansion."""
    laughs = '<!DOCTYPE ovf:Envelope [<!ENTITY a "' + "lol" * 100 + '">' + "".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9)
    ) + "]>"  # fmt: skip
    text = one_disk_ovf("d.raw", MiB, RAW_URL).decode()
    head, _, body = text.replace('encoding="UTF-8"', 'encoding="UTF-16"').partition("\n")
    body = body.replace("<ovf:Name>vm</ovf:Name>", "<ovf:Name>&j;</ovf:Name>")
    ovf = f"{head}\n{laughs}\n{body}".encode("utf-16")
    ova = make_ova(tmp_path / "bomb.ova", [("bomb.ovf", ovf), ("d.raw", bytes(MiB))])
    refused(hyperctl("info", ova, timeout=30), "bomb.ovf", "DOCTYPE")


def test_ova_nested_in_itself(tmp_path):
    """200 OVAs each holding the next as its one disk (of no declared format): the first probe
    that finds a package inside a package refuses it, no recursion down 200 levels."""
    data = make_ova(
        tmp_path / "0.ova", [("0.ovf", one_disk_ovf("d.raw", 512, RAW_URL)), ("d.raw", bytes(512))]
    ).read_bytes()
    for n in range(1, 200):
        ovf = one_disk_ovf(f"{n - 1}.ova", MiB, UNKNOWN_URL)
        data = make_ova(
            tmp_path / "n.ova", [(f"{n}.ovf", ovf), (f"{n - 1}.ova", data)]
        ).read_bytes()
    refused(hyperctl("info", tmp_path / "n.ova", timeout=30), "itself a package")


def test_ova_with_too_many_members(tmp_path):
    """10,001 files in a tar: refused once the index passes what any OVA holds."""
    members = [("m.ovf", one_disk_ovf("d.raw", 512, RAW_URL)), ("d.raw", bytes(512))]
    members += [(f"f{n}", b"") for n in range(9_999)]
    ova = make_ova(tmp_path / "many.ova", members)
    refused(hyperctl("info", ova, timeout=30), "more than 10000 files")
