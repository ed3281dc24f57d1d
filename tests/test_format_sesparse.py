"""seSparse extents (ESXi snapshot deltas): generated images read by our reader, judged byte for
byte by qemu-img (through the descriptor, the parent found by parentFileNameHint) and by
dissect.hypervisor; hostile headers refused quickly in a child process under a memory limit;
snapshots (and snapshots of snapshots) opened through the VMDK driver and hyperctl, over a
parent qemu-img made, and a bare extent file refused as the probe refuses it."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypersdk.errors import FormatError, HyperSDKError, UnsupportedFormatError
from hypersdk.extents import Extent
from hypersdk.formats import open_image
from hypersdk.formats._sesparse import (
    GRAIN,
    GT_ENTRIES,
    SESPARSE_MAGIC_BYTES,
    SeSparseExtent,
    is_sesparse,
)
from hypersdk.io import FileRangeReader
from tests import qemu
from tests import sesparse_gen as gen
from tests.fixtures.tools import need

MiB = 1024 * 1024
CAPACITY = 40 * MiB + 1536  # three grain tables, a partial last grain
LAST = CAPACITY // GRAIN  # the partial grain


def _grains(seed: int) -> dict[int, gen.Grain]:
    """Every kind of grain, in runs and alone, over three tables with the middle one's start
    and end touched, a partial last grain; table 1's first 2000 grains left unallocated."""
    rng = random.Random(seed)
    g: dict[int, gen.Grain] = {}
    for i in range(0, 300):  # a run of data
        g[i] = rng.randbytes(GRAIN)
    for i in range(300, 340):  # zero run right after it
        g[i] = gen.ZERO
    for i in range(340, 360):
        g[i] = gen.UNMAPPED
    g[GT_ENTRIES - 1] = rng.randbytes(GRAIN)  # the last grain of table 0 ...
    g[GT_ENTRIES] = rng.randbytes(GRAIN // 2)  # ... and the first of table 1 (a short one)
    for i in rng.sample(range(GT_ENTRIES + 2000, 2 * GT_ENTRIES), 600):
        g[i] = rng.choice([gen.ZERO, gen.UNMAPPED, rng.randbytes(GRAIN), rng.randbytes(GRAIN)])
    g[LAST] = rng.randbytes(1536)
    g[LAST - 1] = gen.UNMAPPED
    return g


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    """(raw bytes, the same as a monolithicSparse VMDK made by qemu-img), data everywhere."""
    d = tmp_path_factory.mktemp("sesparse-parent")
    raw = d / "base.raw"
    rng = random.Random(7)
    with open(raw, "wb") as f:
        for _ in range(CAPACITY // MiB):
            f.write(rng.randbytes(MiB))
        f.write(rng.randbytes(CAPACITY % MiB))
    vmdk = d / "base.vmdk"
    qemu.convert(raw, vmdk, "raw", "vmdk")
    return raw, vmdk


def _snapshot(tmp: Path, parent_vmdk: Path | None, **kwargs) -> tuple[Path, gen.SeSparseFile]:
    if parent_vmdk is not None:
        local = tmp / parent_vmdk.name  # the hint names a sibling, as on a datastore
        if not local.exists():
            shutil.copyfile(parent_vmdk, local)
        parent_vmdk = local
    return gen.make_snapshot(
        tmp, CAPACITY, _grains(kwargs.pop("seed", 1)), parent=parent_vmdk, **kwargs
    )


def _qemu_raw(desc: Path, tmp: Path) -> bytes:
    out = tmp / "qemu.raw"
    qemu.convert(desc, out, "vmdk", "raw")
    return out.read_bytes()


def _dissect_read(desc: Path) -> bytes:
    try:
        from dissect.hypervisor.disk.vmdk import VMDK
    except ImportError:
        need(False, "dissect.hypervisor is not installed (pip install -e .[test])")

    disk = VMDK(desc)
    assert disk.size == CAPACITY
    # read_sectors, not read(): dissect's buffered stream reads past the end of a disk whose
    # size is not a multiple of its buffer (IndexError), and our capacity ends mid-grain
    parts, pos = [], 0
    while pos < disk.size:
        n = min(MiB, disk.size - pos)
        parts.append(disk.read_sectors(pos // 512, n // 512))
        pos += n
    for fh in [d.fh for d in disk.disks]:
        fh.close()
    return b"".join(parts)


def _ours(ext: SeSparseExtent) -> bytes:
    return b"".join(ext.read(o, min(MiB, ext.capacity - o)) for o in range(0, ext.capacity, MiB))


@pytest.mark.parametrize("with_parent", [False, True], ids=["alone", "parent"])
@pytest.mark.parametrize("contiguous", [False, True], ids=["shuffled", "contiguous"])
def test_reads_like_qemu_and_dissect(tmp_path, parent, with_parent, contiguous):
    base_raw, base_vmdk = parent
    desc, made = _snapshot(
        tmp_path,
        base_vmdk if with_parent else None,
        contiguous=contiguous,
        first_cluster=0 if contiguous else 0x3005,  # numbers >= 4096 use the split encoding
    )
    expected = _qemu_raw(desc, tmp_path)
    assert len(expected) == CAPACITY
    grains = _grains(1)
    base = base_raw.read_bytes()
    with open_image(base_vmdk) as p, FileRangeReader(made.path) as r:
        ext = SeSparseExtent(r, CAPACITY // 512, p.read if with_parent else None)
        ours = _ours(ext)
        assert ours == expected
        # unaligned reads crossing grains, kinds and tables
        rng = random.Random(3)
        for _ in range(200):
            off = rng.randrange(CAPACITY)
            n = rng.randrange(min(CAPACITY - off, 3 * GRAIN * rng.choice([1, 100])) + 1)
            assert ext.read(off, n) == expected[off : off + n]
        assert ext.check() == []
        assert ext.info()["grain_tables"] == 3
    # sanity of the oracle: the parent shows through exactly at unallocated grains
    g = GT_ENTRIES + 5  # unallocated
    assert expected[g * GRAIN : (g + 1) * GRAIN] == (
        base[g * GRAIN : (g + 1) * GRAIN] if with_parent else bytes(GRAIN)
    )
    theirs = bytearray(_dissect_read(desc))
    # dissect reads an unmapped grain through to the parent; qemu (and we) read zeros there
    unmapped = [i for i, c in grains.items() if c == gen.UNMAPPED]
    for i in unmapped:
        lo, hi = i * GRAIN, min((i + 1) * GRAIN, CAPACITY)
        assert theirs[lo:hi] == (base[lo:hi] if with_parent else bytes(hi - lo))
        theirs[lo:hi] = bytes(hi - lo)
    assert theirs == ours


def _qemu_map(desc: Path) -> list[dict]:
    res = qemu.run("map", "-f", "vmdk", "--output=json", str(desc))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_extents_match_qemu_map(tmp_path, parent):
    """Our own-grain map (data + zero extents) is what qemu-img map calls depth 0, and the
    overlay over the parent's map is every range qemu says holds data."""
    desc, made = _snapshot(tmp_path, parent[1])
    qmap = _qemu_map(desc)
    want_own = [
        Extent(m["start"], m["length"], m["zero"]) for m in qmap if m["depth"] == 0 and m["present"]
    ]
    want_data = [(m["start"], m["length"]) for m in qmap if m["data"]]
    with open_image(parent[1]) as p, FileRangeReader(made.path) as r:
        ext = SeSparseExtent(r)
        own = list(ext.extents())
        assert own == _merged(want_own)
        assert own == list(ext.iter_extents())
        shown = ext.overlay(p.extents())
        assert [(e.offset, e.length) for e in shown] == _merged_pairs(want_data)
        assert not shown.has_zero_extents
        alone = ext.overlay()
        assert list(alone) == [e for e in own if not e.zero]
        assert [e.offset for e in ext.iter_extents(base=1 << 30)] == [
            e.offset + (1 << 30) for e in own
        ]


def _merged(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].end == e.offset and out[-1].zero == e.zero:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.zero)
        else:
            out.append(e)
    return out


def _merged_pairs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in _merged([Extent(a, n) for a, n in pairs])]


def test_probe_and_descriptor_capacity(tmp_path):
    desc, made = _snapshot(tmp_path, None)
    head = made.path.read_bytes()[:512]
    assert is_sesparse(head) and head.startswith(SESPARSE_MAGIC_BYTES)
    assert not is_sesparse(b"KDMV" + bytes(508)) and not is_sesparse(b"")
    expected = _qemu_raw(desc, tmp_path)
    with FileRangeReader(made.path) as r:
        assert SeSparseExtent(r).capacity == CAPACITY
        short = SeSparseExtent(r, capacity_sectors=16 * MiB // 512)
        assert short.capacity == 16 * MiB
        assert short.read(0, 16 * MiB) == expected[: 16 * MiB]
        assert max(e.end for e in short.extents()) <= 16 * MiB
        with pytest.raises(FormatError, match="beyond the extent"):
            short.read(16 * MiB - 1, 2)
        with pytest.raises(FormatError, match="header holds"):
            SeSparseExtent(r, capacity_sectors=CAPACITY // 512 + 1)


def test_dirty_journal_refused_like_qemu(tmp_path):
    desc, made = _snapshot(tmp_path, None, volatile={"replay_journal": 1})
    res = qemu.run("convert", "-f", "vmdk", "-O", "raw", str(desc), str(tmp_path / "x.raw"))
    assert res.returncode != 0 and "journal" in res.stderr
    with FileRangeReader(made.path) as r, pytest.raises(UnsupportedFormatError, match="journal"):
        SeSparseExtent(r)


def test_check_finds_shared_clusters_and_stray_tables(tmp_path):
    _, made = _snapshot(tmp_path, None, header={"grain_tables_size": 64})  # room for one table
    grains = _grains(1)
    a, b = 0, next(i for i, c in grains.items() if isinstance(c, bytes) and i >= GT_ENTRIES)
    made.patch(made.gt_entry_offset(b), gen.encode_allocated(made.clusters[a]))
    with FileRangeReader(made.path) as r:
        ext = SeSparseExtent(r)
        problems = ext.check()
        assert any("used by another grain" in p for p in problems), problems
        assert any("outside the grain tables region" in p for p in problems), problems
        assert ext.read(b * GRAIN, GRAIN) == ext.read(a * GRAIN, GRAIN)


# ------------------------------------------------------------------------------ hostile files
def _grain_entry(made: gen.SeSparseFile, value: int) -> tuple[int, int]:
    return made.gt_entry_offset(0), value


HOSTILE = {
    # name: (header overrides, volatile overrides, (byte offset, u64) patch or None,
    #        expected error class, text of the message)
    "gd-past-eof": ({"grain_dir_offset": 1 << 50}, {}, None, FormatError, "beyond"),
    "huge-capacity": ({"capacity": 1 << 62}, {}, None, FormatError, "implausible"),
    "64TiB-gd-missing": (
        {"capacity": (64 << 40) // 512, "grain_dir_size": 65536},
        {},
        None,
        FormatError,
        "grain directory at",
    ),
    "gd-too-small": ({"grain_dir_size": 0}, {}, None, FormatError, "less than"),
    "table-past-eof": (
        {},
        {},
        lambda m: (m.gd_offset, gen.GD_ALLOCATED | 0xFFFFFFFF),
        FormatError,
        "beyond the end",
    ),
    "gd-bad-tag": ({}, {}, lambda m: (m.gd_offset, 0x2 << 60), FormatError, "reference"),
    "shared-table": (
        {},
        {},
        lambda m: (m.gd_offset + 8, gen.GD_ALLOCATED | m.gd[0]),
        FormatError,
        "share grain table",
    ),
    "grain-past-eof": (
        {},
        {},
        lambda m: _grain_entry(m, gen.encode_allocated((1 << 60) - 1)),
        FormatError,
        "beyond the end",
    ),
    "unknown-type": ({}, {}, lambda m: _grain_entry(m, 0x7 << 60), FormatError, "type"),
    "stray-bits": ({}, {}, lambda m: _grain_entry(m, 12345), FormatError, "stray"),
    "volatile-past-eof": (
        {"volatile_header_offset": 1 << 40},
        {},
        None,
        FormatError,
        "volatile header at",
    ),
    "volatile-magic": ({}, {"magic": 1}, None, FormatError, "volatile header magic"),
    "version": ({"version": 0x300000001}, {}, None, UnsupportedFormatError, "version"),
    "grain-size": ({"grain_size": 1 << 40}, {}, None, UnsupportedFormatError, "grain"),
    "flags": ({"flags": 1}, {}, None, UnsupportedFormatError, "flags"),
    "reserved": ({"reserved3": 9}, {}, None, UnsupportedFormatError, "reserved"),
    "zero-offsets": ({"grain_tables_offset": 0}, {}, None, FormatError, "is 0"),
}

_CHILD = textwrap.dedent(
    """
    import sys, time
    from hypersdk.errors import HyperSDKError
    from hypersdk.formats._sesparse import SeSparseExtent
    from hypersdk.io import FileRangeReader
    t = time.process_time()  # CPU seconds: a busy machine does not inflate them
    try:
        with FileRangeReader(sys.argv[1]) as r:
            ext = SeSparseExtent(r)
            ext.check()
            ext.extents()
            for e in ext.iter_extents():
                ext.read(e.offset, min(e.length, 1 << 20))
            ext.read(0, min(ext.capacity, 64 << 20))
        print("OPENED")
    except HyperSDKError as exc:
        print(type(exc).__name__, "|", exc)
    print("SECONDS", time.process_time() - t)
    """
)
LIMIT = 512 * MiB  # RLIMIT_AS of the child; the interpreter with numpy takes ~150 MiB


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run_child(path: Path, timeout: float = 60) -> tuple[str, float]:
    """Open, check, map and read ``path`` in a child under LIMIT: (first line, CPU seconds
    the work took; the wall-clock ``timeout`` only catches a hang)."""
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            preexec_fn=_limit,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} still ran after {timeout} s")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    return lines[0], float(lines[-1].split()[1])


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_refused_quickly(tmp_path, case):
    header, volatile, patch, err, text = HOSTILE[case]
    made = gen.write_sesparse(
        tmp_path / "x-sesparse.vmdk", CAPACITY, _grains(2), header=header, volatile=volatile
    )
    if patch is not None:
        made.patch(*patch(made))
    line, seconds = _run_child(made.path)
    name, _, message = line.partition(" | ")
    assert name == err.__name__, line
    assert text in message and str(made.path) in message, line
    assert "\n" not in message
    assert seconds < 10


def test_huge_sparse_directory_is_walked_in_bounded_time(tmp_path):
    """A 64 TiB extent whose 4 Mi-entry grain directory is really in the file (32 MiB, sparse
    on disk): open, check, extents and reads stay well within the limits."""
    grains = {0: b"x" * GRAIN, ((64 << 40) // GRAIN) - 1: gen.ZERO, 12345678: b"y" * GRAIN}
    made = gen.write_sesparse(tmp_path / "big-sesparse.vmdk", 64 << 40, grains, reserve=False)
    assert made.size < 1 << 30
    line, seconds = _run_child(made.path)
    assert line == "OPENED" and seconds < 20, line
    with FileRangeReader(made.path) as r:
        ext = SeSparseExtent(r)
        assert list(ext.iter_extents()) == [
            Extent(0, GRAIN),
            Extent(12345678 * GRAIN, GRAIN),
            Extent((64 << 40) - GRAIN, GRAIN, zero=True),
        ]


def test_short_and_foreign_files(tmp_path):
    cases = {"empty": b"", "short": SESPARSE_MAGIC_BYTES, "kdmv": b"KDMV" + bytes(508)}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with FileRangeReader(p) as r, pytest.raises(FormatError) as exc:
            SeSparseExtent(r)
        assert str(p) in str(exc.value)


def test_corrupted_metadata_never_escapes_as_a_traceback(tmp_path):
    """Random bytes written over the headers, directory and tables: every outcome is a clean
    read or a typed error, never another exception."""
    made = gen.write_sesparse(tmp_path / "f-sesparse.vmdk", CAPACITY, _grains(4), reserve=False)
    pristine = made.path.read_bytes()
    spots = [(0, 208), (512, 32), (made.gd_offset, 24), (made.gt_offset, 3 * gen.GT_BYTES)]
    rng = random.Random(5)
    outcomes = {"ok": 0, "refused": 0}
    with open(made.path, "r+b") as f:
        for _ in range(300):
            hits = [a + rng.randrange(n) for a, n in rng.choices(spots, k=rng.randint(1, 4))]
            for pos in hits:
                f.seek(pos)
                f.write(rng.randbytes(8))
            f.flush()
            try:
                with FileRangeReader(made.path) as r:
                    ext = SeSparseExtent(r)
                    ext.check()
                    ext.extents()
                    ext.read(0, min(ext.capacity, MiB))
                    ext.read(max(ext.capacity - 17 * MiB, 0), min(ext.capacity, MiB))
                outcomes["ok"] += 1
            except HyperSDKError as exc:
                assert "\n" not in str(exc) and str(made.path) in str(exc)
                outcomes["refused"] += 1
            for pos in hits:  # back to the pristine bytes
                f.seek(pos)
                f.write(pristine[pos : pos + 8])
    assert outcomes["ok"] and outcomes["refused"], outcomes
    assert made.path.read_bytes() == pristine


# ------------------------------------------------------------- through the VMDK driver and CLI
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
ROOT = Path(__file__).resolve().parents[1]


def _hyperctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HYPERCTL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in _merged([Extent(a, n) for a, n in pairs if n])]


def test_snapshot_through_hyperctl(tmp_path, parent):
    """An ESXi snapshot (seSparse descriptor + extent) over a monolithicSparse parent made by
    qemu-img: hyperctl convert gives qemu's and dissect's bytes, info shows the chain with each
    layer's own allocation, check reads every grain of it."""
    desc, made = _snapshot(tmp_path, parent[1])
    expected = _qemu_raw(desc, tmp_path)
    out = tmp_path / "ours.raw"
    res = _hyperctl("convert", "-q", "-O", "raw", desc, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == expected
    theirs = bytearray(_dissect_read(desc))
    base = parent[0].read_bytes()
    for i in (i for i, c in _grains(1).items() if c == gen.UNMAPPED):
        lo, hi = i * GRAIN, min((i + 1) * GRAIN, CAPACITY)
        assert theirs[lo:hi] == base[lo:hi]  # dissect reads an unmapped grain through
        theirs[lo:hi] = bytes(hi - lo)
    assert theirs == expected
    qmap = _qemu_map(desc)
    own = _runs([(m["start"], m["length"]) for m in qmap if m["data"] and m["depth"] == 0])
    res = _hyperctl("info", "--json", desc)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "vmdk" and info["subformat"] == "seSparse"
    assert info["backing_file"] == "base.vmdk" and info["backing_format"] == "vmdk"
    assert info["parent_cid"] == f"{gen.vmdk_cid(tmp_path / 'base.vmdk'):08x}"
    assert info["allocated_bytes"] == sum(n for _, n in own)
    (layer,) = info["backing_chain"]
    assert layer["filename"] == str((tmp_path / "base.vmdk").resolve())
    assert layer["subformat"] == "monolithicSparse" and layer["allocated_bytes"] == CAPACITY
    text = _hyperctl("info", desc).stdout
    assert "backing file: base.vmdk" in text
    assert f"\n\nimage: {(tmp_path / 'base.vmdk').resolve()}\n" in text
    res = _hyperctl("check", desc)
    assert res.returncode == 0 and "no errors" in res.stdout, res.stdout + res.stderr
    with open_image(desc) as img:
        assert [(e.offset, e.length) for e in img.own_extents()] == own
        assert [(e.offset, e.length) for e in img.extents()] == _runs(
            [(m["start"], m["length"]) for m in qmap if m["data"]]
        )
        assert isinstance(img.backing, type(img)) and img.backing.backing is None
    # written out again as one disk in another format: qemu-img compares it to the chain
    vmdk = tmp_path / "flat.vmdk"
    assert _hyperctl("convert", "-q", "-O", "vmdk", desc, vmdk).returncode == 0
    qemu.check(vmdk, "vmdk")
    qemu.compare(desc, vmdk, "vmdk", "vmdk")


def test_snapshot_of_a_snapshot(tmp_path, parent):
    """ESXi stacks snapshots: vm-000002 (seSparse) over vm-000001 (seSparse) over the base."""
    first, _ = _snapshot(tmp_path, parent[1])
    rng = random.Random(9)
    grains: dict[int, gen.Grain] = {i: rng.randbytes(GRAIN) for i in range(250, 320)}
    grains.update({i: gen.ZERO for i in range(0, 10)})  # zeros over the first layer's data
    grains.update({i: rng.randbytes(GRAIN) for i in range(2 * GT_ENTRIES, 2 * GT_ENTRIES + 50)})
    second, _ = gen.make_snapshot(
        tmp_path, CAPACITY, grains, parent=first, name="vm-000002", cid=0x22222222
    )
    expected = _qemu_raw(second, tmp_path)
    with open_image(second) as img:
        assert img.read(0, CAPACITY) == expected
        assert img.backing is not None and img.backing.backing is not None
        assert img.info()["parent_cid"] == "5e5aa5e0" and img.info()["cid"] == "22222222"
    assert expected[: 10 * GRAIN] == bytes(10 * GRAIN)
    theirs = bytearray(_dissect_read(second))
    for i, c in _grains(1).items():  # dissect reads the first layer's unmapped grains through
        if c == gen.UNMAPPED and i not in grains:
            lo, hi = i * GRAIN, min((i + 1) * GRAIN, CAPACITY)
            theirs[lo:hi] = bytes(hi - lo)
    assert theirs == expected


def test_bare_extent_is_refused_as_the_probe_refuses_it(tmp_path):
    """The -sesparse.vmdk data file is no disk on its own (its parent is named by the
    descriptor): probed (hypersdk.formats.refused) or opened as -f vmdk, the same refusal."""
    _, made = _snapshot(tmp_path, None)
    errors = []
    for fmt in (None, "vmdk"):
        with pytest.raises(UnsupportedFormatError) as err:
            open_image(made.path, fmt).close()
        errors.append(str(err.value))
    for text in errors:
        assert text.startswith(f"{made.path}: an ESXi seSparse extent (a snapshot's data file)")
        assert "open its descriptor .vmdk instead, which names this file" in text
    res = _hyperctl("convert", "-f", "vmdk", "-O", "raw", made.path, tmp_path / "x.raw")
    assert res.returncode != 0 and "seSparse extent" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.raw").exists()


def test_esxi_absolute_parent_hint_found_by_bare_name(tmp_path, parent):
    """ESXi names the parent by its datastore path: /vmfs/volumes/<datastore>/<vm>/base.vmdk.
    That path is not on this machine (and outside the snapshot's directory anyway), so the
    parent is found by its bare name beside the snapshot, as dissect finds it; info says so."""
    local = tmp_path / "base.vmdk"
    shutil.copyfile(parent[1], local)
    hint = "/vmfs/volumes/datastore1/vm/base.vmdk"
    desc, made = gen.make_snapshot(
        tmp_path, CAPACITY, _grains(1), parent=local, hint=hint, name="esxi"
    )
    relative = gen.write_descriptor(
        tmp_path / "rel.vmdk",
        made.path.name,
        CAPACITY,
        parent_hint="base.vmdk",
        parent_cid=gen.vmdk_cid(local),
    )
    expected = _qemu_raw(relative, tmp_path)  # qemu cannot open the ESXi hint itself
    with open_image(desc) as img:
        assert img.read(0, CAPACITY) == expected
        info = img.info()
        assert info["backing_file"] == hint
        assert "found as 'base.vmdk' in the image's directory" in info["backing_file_found"]
        assert img.backing is not None and img.backing.name == str(local.resolve())
    text = _hyperctl("info", desc).stdout
    assert "backing file found: the hint's own path is refused: found as 'base.vmdk'" in text
    # windows-style hints too
    win = gen.write_descriptor(
        tmp_path / "win.vmdk",
        made.path.name,
        CAPACITY,
        parent_hint="C:\\VMs\\vm\\base.vmdk",
        parent_cid=gen.vmdk_cid(local),
    )
    with open_image(win) as img:
        assert img.read(0, CAPACITY) == expected
        assert "does not exist" in img.info()["backing_file_found"]
