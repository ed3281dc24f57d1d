"""VDI driver: our writer judged by qemu-img (check, compare), our reader judged against images
qemu-img made, refusals of malformed images, a property and a fuzz."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.convert import convert_file
from hypersdk.errors import FormatError, InvalidParameterError, UnsupportedFormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import get_driver, open_image
from tests import qemu
from tests.test_format_vhd import (
    BytesReader,
    assert_reads_as,
    fuzz_reader,
    huge_sparse_stream,
    make_source,
    roundtrip_property,
    write_blocks,
)

MiB = 1024 * 1024


@pytest.mark.parametrize("sub", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["odd", "zero", "random", "sparse"])
def test_write_matches_qemu(tmp_path, kind, sub):
    raw = tmp_path / "src.raw"
    make_source(kind, raw)
    out = tmp_path / "out.vdi"
    res = convert_file(raw, out, "vdi", options={"subformat": sub})
    assert res.output_bytes == os.path.getsize(out)
    qemu.check(out, "vdi")
    qemu.compare(raw, out, "raw", "vdi")
    info = qemu.info(out, "vdi")
    assert info["virtual-size"] == -(-os.path.getsize(raw) // 512) * 512
    assert_reads_as(out, "vdi", raw)
    with open_image(out) as img:  # probed
        assert img.format == "vdi" and img.info()["subformat"] == sub
        if sub == "dynamic" and kind == "zero":
            assert len(img.extents()) == 0 and os.path.getsize(out) <= MiB
    if sub == "static" and kind != "random":  # unallocated blocks stay holes
        assert os.stat(out).st_blocks * 512 < os.path.getsize(raw) // 2 + MiB


def test_static_spelled_like_qemu(tmp_path):
    drv = get_driver("vdi")
    assert drv.plan(3 * MiB, ExtentMap(3 * MiB), {"static": "on"}).static
    assert not drv.plan(3 * MiB, ExtentMap(3 * MiB), {"static": "off"}).static
    with pytest.raises(InvalidParameterError):
        drv.plan(MiB, ExtentMap(MiB), {"subformat": "fixed"})
    with pytest.raises(FormatError, match="delta"):
        drv.plan(4 * MiB, ExtentMap(4 * MiB, [Extent(0, MiB, zero=True)]))


@pytest.mark.parametrize("sub", ["dynamic", "static"])
def test_write_over_4gib_virtual(tmp_path, sub):
    size = 5 * 1024 * MiB + 512
    raw = tmp_path / "big.raw"
    write_blocks(
        raw, size, {0: b"first", 4 * 1024 * MiB + 123: b"past 4 GiB", size - 7: b"end!!!!"}
    )
    out = tmp_path / "big.vdi"
    convert_file(raw, out, "vdi", options={"subformat": sub})
    qemu.check(out, "vdi")
    qemu.compare(raw, out, "raw", "vdi")
    assert qemu.info(out, "vdi")["virtual-size"] == size
    assert os.stat(out).st_blocks * 512 < 16 * MiB
    with open_image(out) as img:
        assert img.virtual_size == size
        assert img.read(4 * 1024 * MiB + 123, 10) == b"past 4 GiB"
        assert img.read(size - 7, 7) == b"end!!!!"


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), sub=st.sampled_from(["dynamic", "static"]))
def test_property_roundtrip(data, sub):
    roundtrip_property("vdi", data, {"subformat": sub})


@pytest.mark.parametrize("static", ["on", "off"])
def test_read_qemu_made(tmp_path, static):
    raw = tmp_path / "src.raw"
    make_source("odd", raw)
    img_path = tmp_path / "q.vdi"
    qemu.convert(raw, img_path, "raw", "vdi", "-o", f"static={static}")
    assert qemu.info(img_path, "vdi")["virtual-size"] == -(-os.path.getsize(raw) // 512) * 512
    assert_reads_as(img_path, "vdi", raw)
    with open_image(img_path) as img:
        assert img.info()["subformat"] == ("static" if static == "on" else "dynamic")


def _small(tmp_path) -> bytes:
    raw = tmp_path / "s.raw"
    write_blocks(raw, 5 * MiB, {0: b"a" * 1000, 4 * MiB + 5: b"b" * 3000})
    out = tmp_path / "s.vdi"
    convert_file(raw, out, "vdi")
    return out.read_bytes()


def _open_bytes(data: bytes):
    return get_driver("vdi").open(BytesReader(data, "bad.vdi"))


def test_discarded_blocks_read_as_zeros(tmp_path):
    good = bytearray(_small(tmp_path))
    struct.pack_into("<I", good, 512, 0xFFFFFFFE)
    with _open_bytes(bytes(good)) as img:
        assert img.read(0, 1000) == bytes(1000)
        assert img.read(4 * MiB + 5, 3000) == b"b" * 3000


def test_malformed(tmp_path):
    good = _small(tmp_path)
    with _open_bytes(good) as img:
        assert img.read(4 * MiB + 5, 3000) == b"b" * 3000
    bad_map = bytearray(good)
    struct.pack_into("<I", bad_map, 512 + 4 * 4, 4)  # block index past the data area
    huge_blocks = bytearray(good)
    struct.pack_into("<I", huge_blocks, 0x180, 0x3FFFFFF0)
    huge_blocks_alloc = bytearray(huge_blocks)
    struct.pack_into("<II", huge_blocks_alloc, 0x180, 0x40000000, 1)
    cases = {
        "truncated": good[: len(good) - 1000],
        "tiny": good[:100],
        "magic": good[:0x40] + b"XXXX" + good[0x44:],
        "map beyond eof": bytes(bad_map),
        "table beyond eof": bytes(huge_blocks),
        "too many blocks": bytes(huge_blocks_alloc),
        "size beyond blocks": good[:0x170] + struct.pack("<Q", 99 * MiB) + good[0x178:],
    }
    for name, data in cases.items():
        with pytest.raises(FormatError, match="bad.vdi"):
            _open_bytes(data)
        assert name
    diff = bytearray(good)
    struct.pack_into("<I", diff, 0x4C, 4)
    with pytest.raises(UnsupportedFormatError, match="differencing"):
        _open_bytes(bytes(diff))


def test_shared_and_misplaced_blocks_refused(tmp_path):
    """Two map entries naming one data block, or data over the block map: refused at open (a
    header can claim any number of such blocks; the file bounds how many honest ones fit)."""
    good = _small(tmp_path)
    shared = bytearray(good)
    struct.pack_into("<I", shared, 512 + 4 * 4, 0)  # guest block 4 -> data block 0, as block 0
    with pytest.raises(FormatError, match="bad.vdi: VDI block map places blocks 0 and 4"):
        _open_bytes(bytes(shared))
    over_map = bytearray(good)
    struct.pack_into("<I", over_map, 0x158, 512)  # the data area starts inside the map
    with pytest.raises(FormatError, match="over the block map"):
        _open_bytes(bytes(over_map))


def test_fuzz_reader(tmp_path):
    good = _small(tmp_path)
    refused = fuzz_reader("vdi", good, [(0x40, 0x1C8 - 0x40), (512, 20)], seed=2)
    assert refused > 20


@pytest.mark.parametrize("sub", ["dynamic", "static"])
def test_huge_sparse_stream_is_exact(sub):
    sink = huge_sparse_stream("vdi", 16 * 1024**4 + 512, {"subformat": sub})
    assert sink.data < 80 * MiB  # header and block map; data blocks of static are holes


@pytest.mark.parametrize("sub", ["dynamic", "static"])
def test_empty_disk(tmp_path, sub):
    raw = tmp_path / "empty.raw"
    raw.write_bytes(b"")
    out = tmp_path / "empty.vdi"
    convert_file(raw, out, "vdi", options={"subformat": sub})
    qemu.check(out, "vdi")
    qemu.compare(raw, out, "raw", "vdi")
    with open_image(out) as img:
        assert img.virtual_size == 0 and len(img.extents()) == 0
