"""Compressed QCOW2 writer: each cluster deflated once (spooled between the passes), vectorised
packing equal to the plain loop, no temporary file left behind on any path, qemu-img as judge."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import hypersdk.formats._qcow2_pack as P
import hypersdk.formats._qcow2_writer as W
import hypersdk.formats.qcow2 as Q
from hypersdk.errors import FormatError, TargetError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import get_driver, open_image
from hypersdk.io import StreamSink
from tests import qemu

KiB, MiB = 1024, 1024 * 1024


class _Source:
    """Guest bytes in memory; ``short`` truncates every later read (a shrinking source)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)
        self.short = False
        self.fail_after: int | None = None
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.size
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError("source went away")
        data = self.data[offset : offset + length]
        return data[: length // 2] if self.short else data


def _content(size: int, cs: int, pattern: str, seed: int = 7) -> bytes:
    """Clusters by letter: r random (stays raw), t text-like (compresses), z zeros, cycled."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    for i in range(-(-size // cs)):
        kind = pattern[i % len(pattern)]
        if kind == "r":
            out += rng.bytes(cs)
        elif kind == "t":
            out += (rng.integers(0, 6, cs, dtype=np.uint8) + ord("a")).tobytes()
        else:
            out += bytes(cs)
    return bytes(out[:size])


def _plan(src: _Source, opts: dict):
    extents = ExtentMap(src.size, [Extent(0, src.size)])
    return get_driver("qcow2").plan(src.size, extents, {"compression": "zlib", **opts})


def _write(src, layout) -> bytes:
    buf = io.BytesIO()
    get_driver("qcow2").write(src, layout, StreamSink(buf))
    return buf.getvalue()


def _spool_fds(directory: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    d = tmp_path / "spool"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _reference_pack(sizes: np.ndarray, cs: int) -> tuple[list[int], int]:
    pos, rel = 0, []
    for v in sizes.tolist():
        if v == 0:
            pos = -(-pos // cs) * cs
            rel.append(pos)
            pos += cs
        else:
            rel.append(pos)
            pos += v
    return rel, pos


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 18])
def test_packer_matches_plain_loop(monkeypatch, chunk):
    monkeypatch.setattr(P, "PACK_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    cs = 4096
    cases = [
        np.zeros(0, np.uint16),
        np.zeros(5, np.uint16),
        np.full(9, 100, np.uint16),
        rng.integers(1, cs, 300).astype(np.uint16),
        np.where(rng.random(2000) < 0.3, 0, rng.integers(1, cs, 2000)).astype(np.uint16),
        np.where(rng.random(500) < 0.9, 0, rng.integers(3000, cs, 500)).astype(np.uint16),
    ]
    for sizes in cases:
        want, end = _reference_pack(sizes, cs)
        packer = Q._Packer(sizes, cs)
        got = []
        while packer.rank < len(sizes):
            rel, sz = packer.take(int(rng.integers(1, 40)))
            assert len(rel) == len(sz) > 0
            got += rel.tolist()
        assert got == want
        assert Q._Packer(sizes, cs).end() == end


@pytest.mark.parametrize("cs", [4096, 65536])
def test_mixed_pieces_match_qemu(tmp_path, spool_dir, cs):
    """Raw, compressed and zero clusters interleaved inside one 4 MiB piece, a raw (random)
    last cluster clipped by the disk end: qemu-img check clean, contents identical."""
    size = 5 * MiB + 4 * cs - 100  # last cluster partial
    tail = size % cs
    data = _content(size - tail, cs, "ttrtzrrtt") + np.random.default_rng(1).bytes(tail)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    src = _Source(data)
    layout = _plan(src, {"cluster_size": str(cs)})
    blob = _write(src, layout)
    assert len(blob) == layout.total_size
    out = tmp_path / "out.qcow2"
    out.write_bytes(blob[: layout.used_size])
    qemu.check(out, "qcow2")
    qemu.compare(raw, out, "raw", "qcow2")
    with open_image(out) as img:
        assert img.read(0, size) == data
        assert img.check() == []
        assert img.info()["compressed_clusters"] > 0
        kinds = [k for k, *_ in img._segments(0, size // cs + 1)]
        assert kinds[-1] == Q._STD and Q._COMP in kinds  # the clipped last cluster stayed raw
    assert _spool_fds(spool_dir) == [] and os.listdir(spool_dir) == []


def test_each_cluster_deflated_once(monkeypatch, spool_dir):
    cs = 65536
    data = _content(6 * MiB + 5, cs, "tttrz")
    calls = []
    lock = threading.Lock()
    real = W.deflate

    def counting(buf, level, *args):
        if level == Q.COMPRESS_LEVEL:
            with lock:
                calls.append(bytes(buf[:16]))
        return real(buf, level, *args)

    monkeypatch.setattr(W, "deflate", counting)
    # zero clusters are data here too (one extent covers the disk) and deflate to little
    text_clusters = sum(1 for i in range(-(-len(data) // cs)) if "tttrz"[i % 5] != "r")

    src = _Source(data)
    plain = _write(src, _plan(src, {}))
    assert len(calls) == text_clusters  # random ones skipped by the sample test, none twice

    calls.clear()
    layout = _plan(src, {})
    exact = layout.measure(src)
    assert len(calls) == text_clusters
    measured = _write(src, layout)
    assert len(calls) == text_clusters  # write emitted measure's spool: no deflate at all
    assert len(measured) == exact == layout.used_size
    # same image either way; the unmeasured one is padded with zeros up to plan's bound
    assert plain[:exact] == measured and not any(plain[exact:])
    assert layout.spool is None and _spool_fds(spool_dir) == []


def test_progress_counts_every_byte_once(spool_dir):
    data = _content(3 * MiB + 77, 4096, "trz")
    src = _Source(data)
    for measure in (False, True):
        seen = []
        layout = _plan(src, {"cluster_size": "4096"})
        if measure:
            layout.measure(src)
        buf = io.BytesIO()
        get_driver("qcow2").write(src, layout, StreamSink(buf), seen.append)
        assert sum(seen) == len(data)


def test_source_changed_since_measure(spool_dir):
    cs = 4096
    data = _content(2 * MiB, cs, "tr")
    src = _Source(data)
    layout = _plan(src, {"cluster_size": str(cs)})
    layout.measure(src)
    first = _write(src, layout)
    assert _write(src, layout) == first  # spool consumed: compresses again, same sizes
    changed = _Source(_content(2 * MiB, cs, "tr", seed=8))
    with pytest.raises(FormatError, match="source changed since measure"):
        _write(changed, layout)
    layout.measure(src)  # no-op: already measured
    layout.release()
    assert _spool_fds(spool_dir) == []


def test_short_read_in_emit_pass(spool_dir):
    data = _content(2 * MiB, 65536, "rt")
    src = _Source(data)
    layout = _plan(src, {})
    layout.measure(src)
    src.short = True  # raw clusters are read again when emitted
    with pytest.raises(FormatError, match="short read"):
        _write(src, layout)
    assert _spool_fds(spool_dir) == []


class _FailingSink:
    """Fails on the n-th write, after checking that the spool exists at that moment."""

    def __init__(self, n: int, spool_dir: Path):
        self.n, self.spool_dir, self.pos = n, spool_dir, 0
        self.spool_seen = False

    def write(self, data) -> int:
        self.n -= 1
        if self.n == 0:
            self.spool_seen = bool(_spool_fds(self.spool_dir))
            raise TargetError("disk full (test)")
        self.pos += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.write(bytes(length))

    def tell(self) -> int:
        return self.pos


@pytest.mark.parametrize("fail_at", [1, 6])  # in the header, in the data
def test_spool_removed_when_the_sink_fails(spool_dir, fail_at):
    data = _content(3 * MiB, 65536, "tr")
    src = _Source(data)
    layout = _plan(src, {})
    sink = _FailingSink(fail_at, spool_dir)
    with pytest.raises(TargetError, match="test"):
        get_driver("qcow2").write(src, layout, sink)
    assert sink.spool_seen
    assert _spool_fds(spool_dir) == [] and os.listdir(spool_dir) == []


def test_spool_removed_when_the_source_fails(spool_dir):
    src = _Source(_content(12 * MiB, 65536, "t"))
    src.fail_after = 2
    layout = _plan(src, {})
    with pytest.raises(OSError, match="went away"):
        layout.measure(src)
    assert layout.spool is None and _spool_fds(spool_dir) == []
    with pytest.raises(OSError, match="went away"):
        _write(src, layout)
    assert _spool_fds(spool_dir) == []


def test_measure_release_frees_the_spool(spool_dir):
    src = _Source(_content(MiB, 65536, "t"))
    layout = _plan(src, {})
    layout.measure(src)
    assert len(_spool_fds(spool_dir)) == 1
    layout.release()
    assert _spool_fds(spool_dir) == []


def test_no_spool_space_is_a_target_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    src = _Source(_content(MiB, 65536, "t"))
    with pytest.raises(TargetError, match="TMPDIR"):
        _write(src, _plan(src, {}))
