"""The fast I/O paths: reused read buffers, vectorised zero detection, probing scans, direct I/O
sinks and the cache modes of atomic publication. Each is checked against a plain reference."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypersdk.atomic import CACHE_MODES, atomic_file
from hypersdk.blockmap import BlockMap, nonzero_extents, zero_blocks
from hypersdk.convert import scan_data_extents
from hypersdk.errors import DiskReadError, InvalidParameterError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats import open_image
from hypersdk.imagegen import write_realistic_disk
from hypersdk.io import FileRangeReader, read_pieces
from tests import qemu
from tests.cli_run import hyperctl, one_line_error

KiB, MiB = 1024, 1024 * 1024


def _reference_zero_flags(data: bytes, block: int) -> list[bool]:
    return [not any(data[i : i + block]) for i in range(0, len(data), block)]


# -- zero detection ---------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(1, 3 * 4096)),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([512, 4096, 65536, 1000]),
)
def test_zero_blocks_match_reference(parts, block):
    # runs of zeros, of data, of data starting with a zero word, and of a lone trailing byte
    chunks = []
    for kind, n in parts:
        if kind == 0:
            chunks.append(bytes(n))
        elif kind == 1:
            chunks.append(os.urandom(n))
        elif kind == 2:
            chunks.append(bytes(min(n, 8)) + b"\x01" * max(0, n - 8))
        else:
            chunks.append(bytes(n - 1) + b"\x07")
    data = b"".join(chunks)
    flags = zero_blocks(memoryview(data), block)
    assert flags.tolist() == _reference_zero_flags(data, block)
    runs = list(nonzero_extents(data, 1000, block))
    expect = [i for i, z in enumerate(_reference_zero_flags(data, block)) if not z]
    covered = sorted(
        {(e.offset - 1000) // block + k for e in runs for k in range(-(-e.length // block))}
    )
    assert covered == expect
    assert all(e.end - 1000 <= len(data) for e in runs)


# -- read_pieces ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("io") / "disk.raw"
    write_realistic_disk(path, 24 * MiB + 4097, seed=11)
    with open(path, "r+b") as f:  # data blocks that start with a zero word, and a zero block
        f.seek(3 * 65536)
        f.write(bytes(8) + b"late data")
        f.seek(5 * 65536 + 65535)
        f.write(b"\x01")
        f.seek(7 * 65536)
        f.write(bytes(65536))
    return path


class _NoReadinto:
    def __init__(self, reader):
        self.size = reader.size
        self.read = reader.read


@pytest.mark.parametrize("threads", [1, 2])
def test_read_pieces_gives_the_bytes_in_order(disk, threads):
    with FileRangeReader(disk) as reader:
        pieces = list(ExtentMap.full(reader.size).split(1 * MiB + 512))
        got = [
            (piece, bytes(view))
            for piece, view in read_pieces(reader, pieces, chunk=2 * MiB, threads=threads)
        ]
        assert [p for p, _ in got] == pieces
        for piece, data in got:
            assert data == reader.read(piece.offset, piece.length)
        # the fallback for sources that can only read()
        plain = [bytes(v) for _, v in read_pieces(_NoReadinto(reader), pieces, chunk=2 * MiB)]
        assert plain == [d for _, d in got]


def test_read_pieces_raises_read_errors_and_stops_cleanly(disk):
    class Failing:
        size = 64 * MiB

        def __init__(self):
            self.calls = 0

        def readinto(self, offset, view):
            self.calls += 1
            if offset >= 8 * MiB:
                raise DiskReadError(f"boom at {offset}")
            view[:] = bytes(len(view))

        def read(self, offset, length):  # pragma: no cover - not used when readinto exists
            raise AssertionError

    src = Failing()
    with pytest.raises(DiskReadError, match="boom"):
        for _ in read_pieces(src, ExtentMap.full(src.size).split(MiB), chunk=MiB):
            pass
    # abandoning the generator early joins its threads (no hang, no further reads piling up)
    src = Failing()
    gen = read_pieces(src, ExtentMap.full(4 * MiB).split(MiB), chunk=MiB, depth=2)
    next(gen)
    gen.close()
    assert src.calls <= 4
    with pytest.raises(ValueError, match="exceeds chunk"):
        list(read_pieces(src, [Extent(0, 2 * MiB)], chunk=MiB))


# -- scans --------------------------------------------------------------------------------------
def test_probe_scan_equals_full_scan_and_block_map(disk):
    with open_image(disk) as image:
        candidates = image.extents()
        full = scan_data_extents(image, candidates)
        probed = scan_data_extents(image, candidates, probe=True)
        assert list(probed) == list(full)
        data = image.read(0, image.size)
    expect = [i for i, z in enumerate(_reference_zero_flags(data, 65536)) if not z]
    blocks = sorted({e.offset // 65536 + k for e in full for k in range(-(-e.length // 65536))})
    assert blocks == expect
    assert 3 in blocks and 5 in blocks and 7 not in blocks
    with FileRangeReader(disk) as reader:
        bmap = BlockMap.scan(reader, reader.allocated())
    assert np.flatnonzero(bmap.hashes).tolist() == expect


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blocks=st.lists(st.sampled_from(["zero", "data", "late", "hole"]), min_size=1, max_size=6),
    tail=st.integers(0, 70000),
    tail_data=st.booleans(),
)
def test_probe_scan_is_exact_for_raw_and_other_formats(tmp_path, blocks, tail, tail_data):
    """The fast file probe (raw) and the generic one (any other format) both agree with a full
    scan, including a last block shorter than the probe width and data hidden behind a zero head."""
    raw = tmp_path / "p.raw"
    raw.unlink(missing_ok=True)
    with open(raw, "wb") as f:
        for kind in blocks:
            if kind == "hole":
                f.seek(65536, os.SEEK_CUR)
            elif kind == "zero":
                f.write(bytes(65536))
            else:
                head = bytes(8) if kind == "late" else b"\x07" * 8
                f.write(head + os.urandom(65528))
        f.write((b"\x05" if tail_data else b"\0") * tail)
        f.truncate(len(blocks) * 65536 + tail)
    qcow = tmp_path / "p.qcow2"
    qcow.unlink(missing_ok=True)
    with open_image(raw) as image:
        expect = scan_data_extents(image, image.extents())
        assert scan_data_extents(image, image.extents(), probe=True) == expect
        from hypersdk.convert import convert_image

        convert_image(image, qcow, "qcow2", cache="unsafe")
    with open_image(qcow) as image:
        probed = scan_data_extents(image, image.extents(), probe=True)
        assert probed == scan_data_extents(image, image.extents())
        assert probed.data_bytes >= expect.data_bytes  # qcow2 rounds the disk up to sectors


# -- sinks and cache modes ----------------------------------------------------------------------
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("w"), st.sampled_from([1, 7, 4095, 4096, 4097, 65536, 3 * MiB + 5])),
        st.tuples(st.just("z"), st.sampled_from([1, 100, 4096, 5000, 2 * MiB, 9 * MiB + 3])),
    ),
    min_size=1,
    max_size=16,
)


def _play(ops, seed):
    rng = np.random.default_rng(seed)
    expect = bytearray()
    steps = []
    for kind, n in ops:
        data = rng.integers(1, 256, n, dtype=np.uint8).tobytes() if kind == "w" else n
        steps.append((kind, data))
        expect += data if kind == "w" else bytes(n)
    return steps, bytes(expect)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_OPS, st.integers(0, 2**32 - 1), st.sampled_from(CACHE_MODES))
def test_atomic_file_cache_modes_write_exact_bytes(tmp_path, ops, seed, cache):
    steps, expect = _play(ops, seed)
    path = tmp_path / f"out-{cache}.bin"
    with atomic_file(path, cache) as sink:
        for kind, data in steps:
            sink.write(memoryview(data)) if kind == "w" else sink.write_zeros(data)
        assert sink.tell() == len(expect)
    assert path.read_bytes() == expect
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_direct_sink_keeps_holes_and_falls_back_where_refused(tmp_path):
    path = tmp_path / "sparse.bin"
    with atomic_file(path, "none") as sink:
        sink.write(b"x" * 5000)
        sink.write_zeros(64 * MiB)
        sink.write(b"y")
    assert path.stat().st_size == 5000 + 64 * MiB + 1
    assert path.stat().st_blocks * 512 < 1 * MiB  # the zeros stayed a hole
    with open(path, "rb") as f:
        assert f.read(5000) == b"x" * 5000
        f.seek(5000 + 64 * MiB)
        assert f.read() == b"y"
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # tmpfs refuses O_DIRECT: page cache instead
        with tempfile.TemporaryDirectory(dir=shm) as d:
            out = Path(d) / "t.bin"
            with atomic_file(out, "none") as sink:
                sink.write(b"abc" * 5000)
            assert out.read_bytes() == b"abc" * 5000
    with pytest.raises(InvalidParameterError, match="cache mode"), atomic_file(tmp_path / "b", "x"):
        pass


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_convert_cache_modes_cli(disk, tmp_path, cache, qemu_img):
    out = tmp_path / f"out-{cache}.qcow2"
    res = hyperctl("convert", "-q", "-t", cache, disk, out)
    assert res.returncode == 0, res.stderr
    qemu.check(out, "qcow2")
    qemu.compare(disk, out, "raw", "qcow2")


def test_convert_rejects_unknown_cache_mode(disk, tmp_path):
    one_line_error(hyperctl("convert", "-t", "fast", disk, tmp_path / "x.qcow2"), "cache mode")
    assert not (tmp_path / "x.qcow2").exists()


def test_local_target_cache_option(tmp_path):
    from providers import open_target

    for cache in CACHE_MODES:
        target = open_target(f"file://{tmp_path}/{cache}?cache={cache}")
        assert target.cache == cache
        target.put_bytes("a/b.bin", b"z" * 10000)
        assert target.get_bytes("a/b.bin") == b"z" * 10000
    assert open_target(str(tmp_path)).cache == "none"  # durable, page-cache free by default
    with pytest.raises(InvalidParameterError, match="cache mode"):
        open_target(f"file://{tmp_path}?cache=fast")
    with pytest.raises(InvalidParameterError, match="only the cache option"):
        open_target(f"file://{tmp_path}?colour=blue")


# -- block maps from an export's own reads -------------------------------------------------------
def test_block_map_builder_from_export_reads_equals_scan(disk, tmp_path):
    from hypersdk.blockmap import BlockMapBuilder
    from hypersdk.pipeline import export_stream

    with open_image(disk) as image:
        extents = scan_data_extents(image, image.extents(), probe=True)
        scanned = BlockMap.scan(image, image.extents())
        for fmt in ("qcow2", "raw", "vmdk"):
            builder = BlockMapBuilder(image.size, extents)
            with atomic_file(tmp_path / f"out.{fmt}") as sink:
                export_stream(image, extents, True, fmt, sink, observers=[builder])
            built = builder.result()
            assert built is not None, fmt
            assert np.array_equal(built.hashes, scanned.hashes), fmt
        # reads that miss a data block, or do not line up with blocks, give no map (scan instead)
        partial = BlockMapBuilder(image.size, extents)
        first = next(iter(extents))
        assert partial.result() is None
        odd = BlockMapBuilder(image.size, extents)
        odd.observe(first.offset + 512, image.read(first.offset + 512, 65536))
        assert odd.result() is None


def test_full_export_then_incremental_reads_the_disk_once(tmp_path, monkeypatch, qemu_img):
    """The flow's path on the local source: a full export's tracker saves the block map from
    the export's reads (no separate scan), and the next run's delta is exactly the change."""
    from hypersdk.imagegen import mutate_disk
    from hypersdk.pipeline import export_stream
    from providers import open_source
    from providers.sources.local import create_vm

    live = tmp_path / "vms" / "vm1" / "disk0.img"
    create_vm(tmp_path / "vms", "vm1", {"disk0": 16 * MiB})
    write_realistic_disk(live, 16 * MiB, seed=4)
    scans = []
    real_scan = BlockMap.scan.__func__
    monkeypatch.setattr(
        BlockMap,
        "scan",
        classmethod(lambda cls, *a, **k: scans.append(1) or real_scan(cls, *a, **k)),
    )
    src = open_source(str(tmp_path / "vms"))
    disk = src.get_vm("vm1").disks[0]
    with src.snapshot("vm1") as s1:
        full = src.changed_extents(s1, disk, None)
        tracker = src.change_tracker(s1, disk, full)
        with src.open_disk(s1, disk) as reader, atomic_file(tmp_path / "full.qcow2") as sink:
            export_stream(reader, full.extents, True, "qcow2", sink, observers=[tracker])
        tracker.commit()
    assert scans == []  # the map came from the export's reads
    qemu.compare(live, tmp_path / "full.qcow2", "raw", "qcow2")
    changed = mutate_disk(live, 4, seed=9)
    with src.snapshot("vm1") as s2:
        delta = src.changed_extents(s2, disk, s1.id)
    assert delta.incremental and scans == [1]  # an incremental scans, to diff
    assert {e.offset for e in delta.extents.split(65536)} == set(changed)


def test_outputs_with_side_files_are_refused_for_exports(disk, tmp_path):
    """A flat VMDK is an extent plus a descriptor naming it: one export object cannot carry it,
    so a request says so up front, and the engine refuses before writing a byte."""
    from hypersdk.pipeline import export_stream
    from hypersdk.requests import validate_request

    flat = {"subformat": "monolithicFlat"}
    with pytest.raises(InvalidParameterError, match="monolithicFlat.*hyperctl convert"):
        validate_request(
            source=str(tmp_path), vm="v", target=str(tmp_path), format="vmdk", format_options=flat
        )
    with pytest.raises(InvalidParameterError, match="cluster_size"):
        validate_request(
            source=str(tmp_path),
            vm="v",
            target=str(tmp_path),
            format="qcow2",
            format_options={"cluster_size": "3"},
        )
    with open_image(disk) as image, atomic_file(tmp_path / "x.vmdk") as sink:
        with pytest.raises(InvalidParameterError, match="monolithicFlat"):
            export_stream(image, image.extents(), True, "vmdk", sink, options=flat)
        assert sink.tell() == 0


def test_manifest_chunks_merge_zero_runs_and_catch_changes(tmp_path):
    """A manifest grows with the data, not the disk: whole zero chunks merge into one ZERO
    entry; the hasher fed by reads, the fallback that reads, and the checker all agree, and the
    checker catches a byte changed inside a zero run as well as inside data."""
    from hypersdk.manifest import ZERO, ChunkHasher, check_chunks, hash_chunks

    size = 64 * MiB
    path = tmp_path / "d.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(40 * MiB + 123)
        f.write(b"tail data")
    with FileRangeReader(path) as reader:
        data = scan_data_extents(reader, reader.allocated())
        hasher = ChunkHasher(ExtentMap.full(size), data)
        for piece, view in read_pieces(reader, data.split(MiB)):
            hasher.feed(piece.offset, view)
        chunks = hasher.finish()
        assert chunks == hash_chunks(reader, ExtentMap.full(size), data=data)
        zero_runs = [c for c in chunks if c[2] == ZERO]
        assert len(chunks) == 5 and len(zero_runs) == 3  # zeros | data x2 | zeros | data | zeros
        assert zero_runs[-1] == (44 * MiB, 20 * MiB, ZERO)
        assert check_chunks(reader, chunks, reader.allocated()) == []
    with open(path, "r+b") as f:
        f.seek(50 * MiB)  # inside a zero run
        f.write(b"!")
        f.seek(6 * MiB)  # inside data
        f.write(b"?")
    with FileRangeReader(path) as reader:
        assert check_chunks(reader, chunks, reader.allocated()) == [4 * MiB, 44 * MiB]


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_publishing_over_an_existing_output(tmp_path, cache):
    """Every cache mode replaces an existing output whole (unsafe swaps the names instead of
    renaming over it: ext4 would flush the whole new file inside a replacing rename), and a
    symlink at the final name is replaced, never written through."""
    out = tmp_path / "out.img"
    out.write_bytes(b"old" * 1000)
    with atomic_file(out, cache) as sink:
        sink.write(b"new" * 2000)
    assert out.read_bytes() == b"new" * 2000
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out.unlink()
    out.symlink_to(victim)
    with atomic_file(out, cache) as sink:
        sink.write(b"fresh")
    assert not out.is_symlink() and out.read_bytes() == b"fresh"
    assert victim.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.img", "victim"]


def test_special_files_at_the_output_name_are_refused(tmp_path, disk):
    """A FIFO (or device) at OUT is refused in one line, before anything is written: an atomic
    rename would silently replace it with a regular file."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidParameterError, match="is a FIFO"), atomic_file(fifo) as sink:
        sink.write(b"never")
    r = hyperctl("convert", "-O", "qcow2", str(disk), str(fifo))
    one_line_error(r, "is a FIFO")
    assert r.returncode == 2
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["out.fifo"]


def test_unsafe_publish_swaps_names_without_a_replacing_rename(tmp_path, monkeypatch):
    """The unsafe path never calls os.replace over an existing file where renameat2 works."""
    import hypersdk.atomic as atomic

    out = tmp_path / "out.img"
    out.write_bytes(b"x" * 4096)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: replaced.append(b) or real_replace(a, b))
    with atomic_file(out, "unsafe") as sink:
        sink.write(b"y" * 4096)
    assert out.read_bytes() == b"y" * 4096
    assert replaced == []
