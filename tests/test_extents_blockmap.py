"""Extent maps and block-hash change tracking: the bookkeeping every export relies on."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.blockmap import BlockMap
from hypersdk.errors import FormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.io import FileRangeReader

BS = 64 * 1024


def test_extent_map_merges_and_rejects_overlap():
    m = ExtentMap(
        100, [Extent(10, 5), Extent(0, 10), Extent(20, 5, zero=True), Extent(25, 5, zero=True)]
    )
    assert list(m) == [Extent(0, 15), Extent(20, 10, True)]
    assert m.data_bytes == 15 and m.defined_bytes == 25
    with pytest.raises(ValueError):
        ExtentMap(100, [Extent(0, 10), Extent(5, 10)])
    with pytest.raises(ValueError):
        ExtentMap(10, [Extent(5, 10)])


def test_split_and_align():
    m = ExtentMap(1000, [Extent(5, 300)])
    assert [(e.offset, e.length) for e in m.split(128)] == [(5, 123), (128, 128), (256, 49)]
    a = ExtentMap(1000, [Extent(5, 10, True), Extent(130, 10)]).aligned(128)
    assert list(a) == [Extent(0, 128, True), Extent(128, 128)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8), st.booleans()), max_size=12))
def test_aligned_covers_every_data_byte(raw):
    size = 70 * 16 + 7
    extents, taken = [], set()
    for start, length, zero in raw:
        rng = set(range(start * 16, min(size, (start + length) * 16)))
        if rng & taken or not rng:
            continue
        taken |= rng
        extents.append(Extent(start * 16, len(rng), zero))
    m = ExtentMap(size, extents)
    a = m.aligned(64)
    covered = {b for e in a.data() for b in range(e.offset, e.end)}
    assert {b for e in m.data() for b in range(e.offset, e.end)} <= covered
    assert all(e.offset % 64 == 0 for e in a)


def _disk(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def test_blockmap_scan_diff_roundtrip(tmp_path):
    size = 40 * BS + 1000  # not block aligned
    path = tmp_path / "d.img"
    rnd = os.urandom(3 * BS)
    _disk(path, size, [(0, rnd[:BS]), (10 * BS + 5, rnd[: 2 * BS]), (40 * BS, b"x" * 1000)])
    with FileRangeReader(path) as r:
        old = BlockMap.scan(r, r.allocated())
    assert [(e.offset, e.length) for e in old.data_extents()] == [
        (0, BS),
        (10 * BS, 3 * BS),
        (40 * BS, 1000),
    ]
    # change one block, zero another, add one
    with open(path, "r+b") as f:
        f.seek(11 * BS)
        f.write(os.urandom(100))
        f.seek(0)
        f.write(bytes(BS))
        f.seek(30 * BS)
        f.write(b"new")
    with FileRangeReader(path) as r:
        new = BlockMap.scan(r, r.allocated())
    diff = new.diff(old)
    assert list(diff) == [Extent(0, BS, True), Extent(11 * BS, BS), Extent(30 * BS, BS)]
    # persistence round trip and corruption
    new.save(tmp_path / "m.bmap")
    loaded = BlockMap.load(tmp_path / "m.bmap")
    assert np.array_equal(loaded.hashes, new.hashes) and loaded.size == size
    (tmp_path / "bad.bmap").write_bytes((tmp_path / "m.bmap").read_bytes()[:-3])
    with pytest.raises(FormatError, match="truncated"):
        BlockMap.load(tmp_path / "bad.bmap")


def test_blockmap_scan_without_seek_data_matches(tmp_path):
    """A source with no allocation info (whole disk scanned) gives the same map."""
    path = tmp_path / "d.img"
    _disk(path, 8 * BS, [(3 * BS, os.urandom(BS))])
    with FileRangeReader(path) as r:
        a = BlockMap.scan(r, r.allocated())
        b = BlockMap.scan(r, None)
    assert np.array_equal(a.hashes, b.hashes)
    assert a.data_extents() == ExtentMap(8 * BS, [Extent(3 * BS, BS)])
