"""Parallels reader: images qemu-img made (several sizes and cluster sizes, sparse and full) read
as qemu-img's own raw conversion of them and as dissect.hypervisor reads them; the old
"WithoutFreeSpace" flavour; hostile headers bounded by the file; qemu-img's format names."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver, open_image
from hypersdk.formats.parallels import MAGIC_SECTORS
from tests import qemu
from tests.fixtures.tools import need
from tests.limited import hyperctl, refused, succeeded
from tests.test_format_vhd import BytesReader, fuzz_reader, make_source

try:  # the second reader (a test dependency)
    from dissect.hypervisor.disk.hdd import HDS
except ImportError:  # pragma: no cover - depends on installed packages
    HDS = None

MiB = 1 << 20


def _made_by_qemu(tmp_path: Path, kind: str, cluster: str) -> tuple[Path, Path]:
    """A raw source of ``kind``, qemu-img's parallels image of it, and qemu-img's raw reading
    of that image (the oracle)."""
    src = tmp_path / f"{kind}.raw"
    make_source(kind, src)
    img = tmp_path / f"{kind}-{cluster}.hds"
    qemu.convert(src, img, "raw", "parallels", "-o", f"cluster_size={cluster}")
    oracle = tmp_path / f"{kind}-{cluster}.oracle.raw"
    qemu.convert(img, oracle, "parallels", "raw")
    return img, oracle


def _reads_as(img: Path, oracle: Path) -> None:
    want = oracle.read_bytes()
    with open_image(img) as image:  # probed
        assert image.format == "parallels"
        assert image.virtual_size == len(want)
        assert image.read(0, len(want)) == want
        assert image.check() == []
        covered = bytearray(len(want))
        for e in image.extents():
            covered[e.offset : e.end] = want[e.offset : e.end]
        assert bytes(covered) == want  # every non-zero byte lies in an extent
    need(HDS is not None, "dissect.hypervisor (a test dependency) is not installed")
    with open(img, "rb") as f:  # a second, independent reader, one cluster at a time: its
        disk = HDS(f)  # runs merge a hole with a next cluster stored at the hole's length
        for at in range(0, len(want), disk.cluster_size):
            disk.seek(at)
            assert disk.read(disk.cluster_size) == want[at : at + disk.cluster_size], at


@pytest.mark.parametrize("cluster", ["64K", "1M", "2M"])
@pytest.mark.parametrize("kind", ["odd", "zero", "random", "sparse"])
def test_reads_qemu_made(tmp_path, kind, cluster):
    img, oracle = _made_by_qemu(tmp_path, kind, cluster)
    _reads_as(img, oracle)


def test_reads_preallocated_and_created(tmp_path):
    """An image qemu-img created and preallocated (every cluster in the file) and an empty one."""
    for opts in (["-o", "preallocation=full"], []):
        img = tmp_path / "c.hds"
        res = qemu.run("create", "-f", "parallels", *opts, str(img), "5M")
        assert res.returncode == 0, res.stderr
        oracle = tmp_path / "c.raw"
        qemu.convert(img, oracle, "parallels", "raw")
        _reads_as(img, oracle)


def _to_sector_units(data: bytes) -> bytes:
    """The same image in the old "WithoutFreeSpace" flavour: BAT entries count sectors."""
    buf = bytearray(data)
    tracks, entries = struct.unpack_from("<II", buf, 28)
    bat = np.frombuffer(buf, dtype="<u4", count=entries, offset=64).astype(np.uint64) * tracks
    buf[64 : 64 + entries * 4] = bat.astype("<u4").tobytes()
    buf[:16] = MAGIC_SECTORS
    return bytes(buf)


def test_reads_sector_flavour(tmp_path):
    img, oracle = _made_by_qemu(tmp_path, "sparse", "64K")
    old = tmp_path / "old.hds"
    old.write_bytes(_to_sector_units(img.read_bytes()))
    again = tmp_path / "old.oracle.raw"
    qemu.convert(old, again, "parallels", "raw")  # qemu reads it as the same disk
    assert again.read_bytes() == oracle.read_bytes()
    _reads_as(old, oracle)
    with open_image(old) as image:
        assert image.info()["subformat"] == "WithoutFreeSpace"


def test_cli_convert_and_names(tmp_path):
    """hyperctl converts a parallels image; qemu-img's format names are accepted; it is
    read-only."""
    img, oracle = _made_by_qemu(tmp_path, "odd", "1M")
    out = tmp_path / "out.qcow2"
    succeeded(hyperctl("convert", "-q", "-f", "parallels", img, out))
    qemu.compare(oracle, out, "raw", "qcow2")
    info = succeeded(hyperctl("info", img))
    assert "format: parallels" in info and "allocated clusters: 3" in info  # 0, 2 and 5 MiB
    assert get_driver("vpc") is get_driver("vhd") and get_driver("VPC").name == "vhd"
    assert get_driver("parallels").name == "parallels"
    with pytest.raises(InvalidParameterError, match="cannot be written"):
        get_driver("parallels").plan(MiB, ExtentMap.full(MiB))
    res = hyperctl("convert", "-O", "parallels", oracle, tmp_path / "x.hds")
    refused(res, "cannot be written", code=2)


def test_unclean_image_reported(tmp_path):
    img, oracle = _made_by_qemu(tmp_path, "odd", "1M")
    data = bytearray(img.read_bytes())
    struct.pack_into("<I", data, 44, 0x746F6E59)  # in_use: left open by its writer
    img.write_bytes(bytes(data))
    assert qemu.run("check", "-f", "parallels", str(img)).returncode != 0  # qemu: an error too
    with open_image(img) as image:
        assert image.read(0, image.virtual_size) == oracle.read_bytes()  # still readable
        assert image.check() == ["the image was not closed cleanly (in_use is set)"]


def _small(tmp_path: Path) -> bytes:
    img, _ = _made_by_qemu(tmp_path, "odd", "64K")
    return img.read_bytes()


def test_malformed(tmp_path):
    good = _small(tmp_path)
    tracks, entries = struct.unpack_from("<II", good, 28)
    first = struct.unpack_from("<I", good, 64)[0]
    assert first  # the first cluster holds data

    def patched(fmt: str, at: int, value: int, data: bytes = good) -> bytes:
        buf = bytearray(data)
        struct.pack_into(fmt, buf, at, value)
        return bytes(buf)

    cases = {
        "tiny": (good[:40], "too small"),
        "version": (patched("<I", 16, 3), "not a Parallels image"),
        "no cluster": (patched("<I", 28, 0), "cluster size of 0"),
        "BAT past the end": (patched("<I", 32, 1 << 30), "BAT .* beyond the end"),
        "disk past the BAT": (patched("<Q", 36, entries * tracks + 1), "exceeds its BAT"),
        "cluster past the end": (patched("<I", 64, len(good) // (tracks * 512)), "beyond the end"),
        "shared cluster": (patched("<I", 68, first), "same file space"),
        "extension over data": (patched("<Q", 56, first * tracks), "format extension"),
        # in sectors, an entry can point into the header and BAT
        "cluster over the BAT": (patched("<I", 64, 1, _to_sector_units(good)), "header and BAT"),
    }
    for name, (data, problem) in cases.items():
        with pytest.raises(FormatError, match=problem) as err:
            get_driver("parallels").open(BytesReader(data, "bad.hds"))
        assert str(err.value).startswith("bad.hds: "), name


def test_fuzz_reader(tmp_path):
    good = _small(tmp_path)
    refused_count = fuzz_reader("parallels", good, [(0, 64), (64, 64)], seed=7)
    assert refused_count > 20


def _hostile(path: Path, *, tracks: int, entries: int, sectors: int, size: int, bat: bytes = b""):
    hdr = struct.pack(
        "<16sIIIIIQIIIQ", b"WithouFreSpacExt", 2, 16, 1, tracks, entries, sectors, 0, 0, 0, 0
    )
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(hdr + bat)
    return path


def test_hostile_huge_bat_of_holes(tmp_path):
    """A 256 MiB file of holes whose header claims 64 Mi one-sector clusters: read a chunk at a
    time and kept sparse (all unallocated), within 1 GiB, in seconds."""
    entries = 64 * MiB - 64
    img = _hostile(
        tmp_path / "holes.hds", tracks=1, entries=entries, sectors=entries, size=64 + entries * 4
    )
    out = succeeded(hyperctl("info", img, timeout=30))
    assert "allocated clusters: 0" in out and f"({entries * 512} bytes)" in out


def test_hostile_every_entry_names_one_cluster(tmp_path):
    """8 Mi BAT entries all naming the one cluster after the BAT: refused, not walked."""
    entries = 8 * MiB
    end = -(-(64 + entries * 4) // 512)
    bat = np.full(entries, end, dtype="<u4").tobytes()
    img = _hostile(
        tmp_path / "same.hds", tracks=1, entries=entries, sectors=entries,
        size=(end + 1) * 512, bat=bat,
    )  # fmt: skip
    for cmd in ("info", "check"):
        refused(hyperctl(cmd, img, timeout=30), str(img), "share space")


def test_hostile_claims_past_the_file(tmp_path):
    """A BAT of 2^30 entries in a file of 4 KiB: refused before anything is read."""
    img = _hostile(tmp_path / "claims.hds", tracks=2048, entries=1 << 30, sectors=1, size=4096)
    refused(hyperctl("info", img, timeout=30), "BAT", "beyond the end")
    assert os.path.getsize(img) == 4096
