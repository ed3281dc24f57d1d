"""Disks fragmented past MAX_EXTENTS: maps stay bounded by bridging the smallest gaps, and what
is written from a bridged map is still byte-identical (full exports, deltas, every format)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk import extents as extents_mod
from hypersdk.atomic import atomic_file
from hypersdk.convert import convert_file
from hypersdk.extents import Extent, ExtentCollector
from hypersdk.imagegen import mutate_disk
from tests import qemu

MiB = 1024 * 1024
BLOCK = 64 * 1024


@st.composite
def _ascending_extents(draw):
    """Ascending, non-overlapping extents (data or zero) with gaps of any size, even none."""
    out, pos = [], 0
    for _ in range(draw(st.integers(0, 60))):
        pos += draw(st.integers(0, 5000))
        length = draw(st.integers(1, 5000))
        out.append(Extent(pos, length, draw(st.booleans())))
        pos += length
    return out, pos + draw(st.integers(0, 100))


@settings(max_examples=300, deadline=None)
@given(case=_ascending_extents(), limit=st.integers(2, 12))
def test_collector_bounds_the_map_and_keeps_every_byte_defined(case, limit):
    given_extents, size = case
    collector = ExtentCollector(size, limit)
    collector.extend(given_extents)
    built = list(collector.build())
    assert len(built) < limit
    for a, b in zip(built, built[1:], strict=False):  # sorted, disjoint, merged
        assert a.end <= b.offset and not (a.end == b.offset and a.zero == b.zero)
    # every input byte stays defined: data inside data; zeros inside a zero extent or inside
    # data (bridged: the writer reads the zeros from the source); nothing outside the input hull
    for e in given_extents:
        cover = [b for b in built if b.offset <= e.offset and e.end <= b.end]
        assert len(cover) == 1, (e, built)
        assert e.zero or not cover[0].zero
    gaps = sum(b.offset - a.end for a, b in zip(given_extents, given_extents[1:], strict=False))
    bridged = sum(b.length for b in built) - sum(e.length for e in given_extents)
    assert 0 <= bridged == collector.bridged <= gaps
    if given_extents:
        assert built[0].offset == given_extents[0].offset and built[-1].end == given_extents[-1].end


def _scattered_disk(path, size: int, blocks: int, seed: int) -> None:
    """``blocks`` data blocks with holes between them, plus a run of written zeros."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for b in sorted({int(x) for x in rng.integers(0, size // BLOCK, blocks)}):
            f.seek(b * BLOCK + int(rng.integers(0, 4096)))
            f.write(rng.bytes(int(rng.integers(1, 3 * BLOCK))))
        f.seek(size // 2)
        f.write(bytes(3 * BLOCK))


def test_bridged_maps_export_and_convert_identically(tmp_path, monkeypatch, qemu_img):
    """With MAX_EXTENTS forced down to 6, a full export, an incremental one and a convert to
    every format all come from bridged maps, and qemu-img finds each output identical."""
    from hypersdk.pipeline import export_stream
    from providers import open_source
    from providers.sources.local import create_vm

    monkeypatch.setattr(extents_mod, "MAX_EXTENTS", 6)
    size = 16 * MiB + 4097
    create_vm(tmp_path / "vms", "vm1", {"disk0": size})
    live = tmp_path / "vms" / "vm1" / "disk0.img"
    _scattered_disk(live, size, 40, seed=3)
    src = open_source(str(tmp_path / "vms"))
    disk = src.get_vm("vm1").disks[0]

    with src.snapshot("vm1") as s1:
        full = src.changed_extents(s1, disk, None)
        assert len(full.extents) < 6
        tracker = src.change_tracker(s1, disk, full)
        with src.open_disk(s1, disk) as reader, atomic_file(tmp_path / "full.qcow2") as sink:
            export_stream(reader, full.extents, True, "qcow2", sink, observers=[tracker])
        tracker.commit()
    qemu.check(tmp_path / "full.qcow2", "qcow2")
    qemu.compare(live, tmp_path / "full.qcow2", "raw", "qcow2")

    changed = mutate_disk(live, 12, seed=5)
    zeroed = next(iter(full.extents)).offset  # a data block the guest zeroes: a zero extent
    with open(live, "r+b") as f:
        f.seek(zeroed)
        f.write(bytes(BLOCK))
    changed.append(zeroed)
    with src.snapshot("vm1") as s2:
        delta = src.changed_extents(s2, disk, s1.id)
        assert delta.incremental and len(delta.extents) < 6
        options = {"backing_file": "full.qcow2", "backing_format": "qcow2"}
        with src.open_disk(s2, disk) as reader, atomic_file(tmp_path / "delta.qcow2") as sink:
            export_stream(reader, delta.extents, False, "qcow2", sink, options)
    assert all(any(e.offset <= o < e.end for e in delta.extents) for o in changed)
    qemu.check(tmp_path / "delta.qcow2", "qcow2")
    qemu.compare(live, tmp_path / "delta.qcow2", "raw", "qcow2")  # base + delta == the disk

    for fmt, qfmt in (
        ("raw", "raw"),
        ("qcow2", "qcow2"),
        ("vmdk", "vmdk"),
        ("vhd", "vpc"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),
    ):
        out = tmp_path / f"c.{fmt}"
        convert_file(live, out, fmt, cache="unsafe")
        if qfmt not in ("raw", "vpc"):  # qemu-img has no check for these
            qemu.check(out, qfmt)
        qemu.compare(live, out, "raw", qfmt)
    assert os.path.getsize(tmp_path / "c.raw") == size
