"""Extent maps and block-hash change tracking: the bookkeeping every export relies on."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.blockmap import BlockMap
from hypersdk.errors import FormatError, TargetError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.io import FileRangeReader
from tests import limited

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


# -- saving and loading hostile places ----------------------------------------------------------


def _small_map() -> BlockMap:
    hashes = np.arange(1, 5, dtype=np.uint64)
    return BlockMap(4 * BS - 10, BS, hashes)


def test_blockmap_save_never_writes_through_a_planted_name(tmp_path, monkeypatch):
    """The temporary name is random and created O_EXCL|O_NOFOLLOW; a symlink at the final name
    is replaced, never followed."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    path = tmp_path / "m.bmap"
    old_tmp = tmp_path / f"m.bmap.tmp-{os.getpid()}"  # the name save() used to write through
    os.symlink(victim, old_tmp)
    os.symlink(victim, path)
    used: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        used.append(os.fspath(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    _small_map().save(path)
    _small_map().save(path)
    assert victim.read_bytes() == b"not yours" and os.path.islink(old_tmp)
    assert not os.path.islink(path) and np.array_equal(BlockMap.load(path).hashes, [1, 2, 3, 4])
    assert len(used) == 2 and used[0] != used[1] and str(old_tmp) not in used
    assert all(os.path.dirname(u) == str(tmp_path) for u in used)
    assert sorted(os.listdir(tmp_path)) == sorted(["victim", "m.bmap", old_tmp.name])

    # had someone guessed the temporary name, the create fails: nothing written anywhere
    monkeypatch.setattr("hypersdk.atomic.secrets.token_hex", lambda n: "0" * (2 * n))
    guessed = tmp_path / f".other.bmap.partial-{'0' * 16}"
    os.symlink(victim, guessed)
    with pytest.raises(TargetError, match="other.bmap"):
        _small_map().save(tmp_path / "other.bmap")
    assert victim.read_bytes() == b"not yours" and not (tmp_path / "other.bmap").exists()


_LOAD_EACH = """
import sys
from hypersdk.blockmap import BlockMap
for path in sys.argv[1:]:
    try:
        BlockMap.load(path)
        print("LOADED", path, flush=True)
    except Exception as exc:
        print(type(exc).__name__, "|", exc, flush=True)
"""


def _load_in_child(*paths) -> list[str]:
    """Load each path in a child under 1 GiB of address space and a timeout: one line each."""
    res = limited.python(_LOAD_EACH, *paths, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == len(paths), res.stdout + res.stderr[-2000:]
    return lines


def test_blockmap_load_refuses_what_is_not_a_regular_file(tmp_path):
    """A FIFO planted as a map is refused at once (a plain open() waits for a writer forever);
    so are a symlink (even to a valid map) and a directory."""
    good = tmp_path / "good.bmap"
    _small_map().save(good)
    fifo, link, folder = tmp_path / "fifo.bmap", tmp_path / "link.bmap", tmp_path / "dir.bmap"
    os.mkfifo(fifo)
    os.symlink(good, link)
    folder.mkdir()
    lines = _load_in_child(fifo, link, folder, good)
    for line, path in zip(lines[:3], (fifo, link, folder), strict=True):
        assert line.startswith(f"FormatError | {path}: "), line
    assert "not a regular file" in lines[0] and "symlink" in lines[1], lines
    assert lines[3] == f"LOADED {good}"


def _map_bytes(meta: bytes, meta_len: int | None = None) -> bytes:
    return b"HSDKBMAP" + struct.pack("<I", len(meta) if meta_len is None else meta_len) + meta


def test_blockmap_load_hostile_headers_are_format_errors_in_bounded_memory(tmp_path):
    """Truncated, oversized and lying headers: each a FormatError naming the file, whatever the
    header claims, under a 1 GiB address-space limit."""
    meta = json.dumps({"size": 4 * BS, "block_size": BS}).encode()
    cases = {
        "short": b"HSDK",
        "magic-only": b"HSDKBMAP",
        "huge-meta-len": _map_bytes(meta, 0xFFFFFFFF),
        "meta-past-end": _map_bytes(meta, len(meta) + 100),
        "nested": _map_bytes(b"[" * 4000),  # json's recursion limit
        "not-an-object": _map_bytes(b"[1, 2]"),
        "float-size": _map_bytes(b'{"size": 1.5e6, "block_size": 65536}') + bytes(8 * 16),
        "negative": _map_bytes(b'{"size": -1, "block_size": -65536}'),
        "zero-block": _map_bytes(b'{"size": 10, "block_size": 0}'),
        "short-hashes": _map_bytes(meta) + bytes(8 * 3),
    }
    paths = []
    for name, data in cases.items():
        (tmp_path / f"{name}.bmap").write_bytes(data)
        paths.append(tmp_path / f"{name}.bmap")
    # a sparse file as long as its header says: 8 GiB of hashes nobody wrote
    bomb = tmp_path / "bomb.bmap"
    head = _map_bytes(json.dumps({"size": BS << 30, "block_size": BS}).encode())
    with open(bomb, "wb") as f:
        f.write(head)
        f.truncate(len(head) + (8 << 30))
    paths.append(bomb)
    lines = _load_in_child(*paths)
    for line, path in zip(lines, paths, strict=True):
        assert line.startswith(f"FormatError | {path}: "), line
    assert "more than" in lines[-1], lines[-1]
