"""Hostile QCOW2 and VMDK images: references (backing files, extents, VMDK parent disks) that try
to leave the image's directory, VMDK parent chains that loop, run too deep or do not match, headers
that claim far more than the file holds, damage only a full read can find, deltas reported per
layer, and VMDK kinds we recognise but do not read. Every DoS case runs in a child process under
a memory limit and a timeout well above what the reader needs (about a second)."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hypersdk.convert import convert_file
from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.formats import _qcow2_layout as Q
from hypersdk.formats import _vmdk_layout as V
from hypersdk.formats import open_image
from hypersdk.references import ReferencePolicy
from tests import qemu
from tests.fixtures.tools import need_tool

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
SECRET = b"OUTSIDE-SECRET-0123456789"


def _qemu_img(*args) -> None:
    res = subprocess.run(
        [need_tool("qemu-img"), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def _raw(path: Path, size: int, blocks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in blocks.items():
            f.seek(off)
            f.write(data)
    return path


def _delta(path: Path, backing: str, fmt: str = "qcow2", size: str = "1M") -> Path:
    """A qcow2 naming ``backing`` (not opened: -u), with a little data of its own."""
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, size)
    return path


def _hyperctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HYPERCTL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory next to the image's, holding a qcow2 and a raw file full of SECRET."""
    d = tmp_path / "outside"
    d.mkdir()
    raw = _raw(d / "secret.raw", MiB, {i * 4096: SECRET for i in range(256)})
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, d / "base.qcow2")
    return d


@pytest.fixture
def home(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def _refused(image: Path, *needles: str, fmt: str | None = None) -> FormatError:
    """Opening and converting ``image`` fail naming it and ``needles``; nothing is written,
    and no byte of the outside file reaches the error."""
    with pytest.raises(FormatError) as err:
        open_image(image, fmt).close()
    text = str(err.value)
    assert str(image) in text, text
    for n in needles:
        assert n in text, text
    assert SECRET.decode() not in text
    out = image.parent / "out.raw"
    with pytest.raises(FormatError):
        convert_file(image, out, "raw")
    assert not out.exists()
    return err.value


# ------------------------------------------------------------------------- 2. references
def test_backing_absolute_host_file_is_refused(home, outside):
    target = outside / "secret.raw"
    _refused(_delta(home / "abs.qcow2", str(target), "raw"), str(target), "outside")


def test_backing_dotdot_is_refused(home, outside):
    _refused(_delta(home / "up.qcow2", "../outside/base.qcow2"), "../outside/base.qcow2")


def test_backing_symlink_to_outside_is_refused(home, outside):
    (home / "base.qcow2").symlink_to(outside / "base.qcow2")
    _refused(_delta(home / "link.qcow2", "base.qcow2"), str(outside / "base.qcow2"))


def test_backing_in_symlinked_directory_is_refused(home, outside):
    (home / "sub").symlink_to(outside, target_is_directory=True)
    _refused(_delta(home / "dir.qcow2", "sub/base.qcow2"), str(outside / "base.qcow2"))


def test_vmdk_extents_outside_are_refused(home, outside):
    (home / "flat-link.vmdk").symlink_to(outside / "secret.raw")
    (home / "sub").symlink_to(outside, target_is_directory=True)
    for i, name in enumerate(
        [str(outside / "secret.raw"), "../outside/secret.raw", "flat-link.vmdk", "sub/secret.raw"]
    ):
        desc = home / f"d{i}.vmdk"
        desc.write_text(
            f'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
            f'RW 2048 FLAT "{name}" 0\n'
        )
        _refused(desc, "extent file", str(outside / "secret.raw"))


# ----------------------------------------------------------- 2b. VMDK parent disks (deltas)
def _vmdk_child(path: Path, parent: str) -> Path:
    """A monolithicSparse delta made by qemu-img, whose parentFileNameHint is ``parent`` as
    given (qemu resolves it from the child's directory and writes the parent's CID)."""
    _qemu_img("create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk", path)
    return path


@pytest.fixture
def secret_vmdk(outside) -> Path:
    """A VMDK outside the images' directory, every byte of its data SECRET."""
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", outside / "secret.raw", outside / "secret.vmdk")
    return outside / "secret.vmdk"


def _leaks(image: Path) -> bool:
    """Whether ``image``, its references trusted, would show the outside file's bytes."""
    with open_image(image, policy=ReferencePolicy(allow_outside=True)) as img:
        return SECRET in img.read(0, img.virtual_size)


def test_vmdk_parent_outside_is_refused(home, secret_vmdk):
    """A delta naming an outside parent: by absolute path, by ../, through a symlinked file or
    directory. Each would show the outside file (trusted, it does), each is refused naming it."""
    (home / "link.vmdk").symlink_to(secret_vmdk)
    (home / "sub").symlink_to(secret_vmdk.parent, target_is_directory=True)
    for i, hint in enumerate(
        [str(secret_vmdk), "../outside/secret.vmdk", "link.vmdk", "sub/secret.vmdk"]
    ):
        child = _vmdk_child(home / f"c{i}.vmdk", hint)
        assert _leaks(child)
        err = _refused(child, "parent disk", repr(hint), str(secret_vmdk), "outside")
        assert "--allow-backing-outside" in str(err)


def test_vmdk_esxi_hint_falls_back_only_inside(home, secret_vmdk):
    """An absolute hint that is refused falls back to its bare name in the delta's directory:
    found there, that file is the parent (never the outside one); missing, both are named."""
    child = _vmdk_child(home / "c.vmdk", str(secret_vmdk))
    err = _refused(child, str(secret_vmdk), "its bare name 'secret.vmdk' is no better")
    assert str(home / "secret.vmdk") in str(err) and "does not exist" in str(err)
    local = _raw(home / "local.raw", MiB, {0: b"local data"})
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", local, home / "secret.vmdk")
    cid = open_image(home / "secret.vmdk").info()["cid"]
    data = bytearray(child.read_bytes())  # the local file is the parent this delta names
    h = V.SparseHeader.unpack(bytes(data[:512]))
    lo, n = h.descriptor_offset * 512, h.descriptor_size * 512
    text = bytes(data[lo : lo + n]).split(b"\0", 1)[0]
    text = re.sub(rb"parentCID=[0-9a-fA-F]+", b"parentCID=" + cid.encode(), text)
    data[lo : lo + n] = text.ljust(n, b"\0")
    child.write_bytes(bytes(data))
    with open_image(child) as img:
        assert img.read(0, 10) == b"local data" and SECRET not in img.read(0, MiB)
        assert img.backing.name == str((home / "secret.vmdk").resolve())
        assert "refused: found as 'secret.vmdk'" in img.info()["backing_file_found"]


def _se_child(d: Path, name: str, hint: str, cid: int, parent_cid: int, size: int = MiB) -> Path:
    """An seSparse delta (no grain of its own: every byte shows its parent) by hand."""
    from tests import sesparse_gen as gen

    gen.write_sesparse(d / f"{name}-sesparse.vmdk", size, {})
    return gen.write_descriptor(
        d / f"{name}.vmdk",
        f"{name}-sesparse.vmdk",
        size,
        parent_hint=hint,
        parent_cid=parent_cid,
        cid=cid,
    )


def test_vmdk_parent_cid_mismatch_is_refused(home, secret_vmdk):
    base = _raw(home / "base.raw", MiB, {0: b"base"})
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", base, home / "base.vmdk")
    cid = open_image(home / "base.vmdk").info()["cid"]
    child = _se_child(home, "snap", "base.vmdk", 0x1111, 0xDEADBEEF)
    _refused(child, f"has CID {cid}", "parentCID is deadbeef", "parent disk 'base.vmdk'")
    assert qemu.run("convert", "-O", "raw", str(child), str(home / "q.raw")).returncode != 0


def test_vmdk_parent_loops_are_refused(home):
    me = _se_child(home, "me", "me.vmdk", 0x1234, 0x1234)  # names itself
    _refused(me, "chain loops back to", str(me.resolve()))
    a = _se_child(home, "a", "b.vmdk", 0xA, 0xB)  # a -> b -> a
    _se_child(home, "b", "a.vmdk", 0xB, 0xA)
    _refused(a, "parent disk 'b.vmdk'", "chain loops back to", str(a.resolve()))


def test_vmdk_parent_chain_depth_is_limited(home):
    """17 disks (a base and 16 deltas) are one too many, as for qcow2; 16 open and read each
    layer's grain. The deep case runs in a child under the memory limit."""
    from tests import sesparse_gen as gen

    gen.write_sesparse(home / "d0-sesparse.vmdk", MiB, {0: b"layer 0"})
    gen.write_descriptor(home / "d0.vmdk", "d0-sesparse.vmdk", MiB, cid=0x100)
    for i in range(1, 17):
        gen.write_sesparse(home / f"d{i}-sesparse.vmdk", MiB, {i: b"layer %d" % i})
        gen.write_descriptor(
            home / f"d{i}.vmdk",
            f"d{i}-sesparse.vmdk",
            MiB,
            parent_hint=f"d{i - 1}.vmdk",
            parent_cid=0x100 + i - 1,
            cid=0x100 + i,
        )
    with open_image(home / "d15.vmdk") as img:
        for i in range(16):
            assert img.read(i * 4096, 8).rstrip(b"\0") == b"layer %d" % i
    deep = home / "d16.vmdk"
    got = _bounded(deep, ops="extents")[str(deep)]
    assert "chain deeper than 16" in got["open"] and str(deep) in got["open"], got
    _refused(deep, "deeper than 16")


def test_vmdk_in_a_package_may_not_name_a_parent(home):
    """A delta inside an OVA names 'base.vmdk', which does exist next to the OVA: refused."""
    from hypersdk.models import DiskInfo, VMInfo
    from hypersdk.ovf import DiskFile, build_ovf

    _raw(home / "secret.raw", MiB, {0: SECRET})
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", home / "secret.raw", home / "base.vmdk")
    member = _vmdk_child(home / "member.vmdk", "base.vmdk")
    info = DiskInfo(name="disk0", capacity=MiB, controller="scsi0")
    vm = VMInfo(name="vm", id="vm", disks=[info])
    ovf = build_ovf(vm, [DiskFile(info, "disk.vmdk", "file1", "vmdisk1")])
    ova = home / "x.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("vm.ovf", ovf), ("disk.vmdk", member.read_bytes())):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tf.addfile(entry, io.BytesIO(data))
    _refused(ova, "x.ova:disk.vmdk", "base.vmdk", "may not name a parent disk")


def test_fifo_references_do_not_hang(home):
    """A FIFO named as backing or extent: refused as not a regular file, never opened (a child
    process with a timeout, so a regression hangs nothing)."""
    os.mkfifo(home / "fifo")
    top = _delta(home / "top.qcow2", "fifo", "raw")
    desc = home / "f.vmdk"
    desc.write_text('# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT "fifo" 0\n')
    (home / "flat.raw").write_bytes(bytes(4096))
    delta = home / "delta.vmdk"  # a VMDK delta naming the FIFO as its parent
    delta.write_text(
        '# Disk DescriptorFile\nCID=1\nparentCID=2\ncreateType="monolithicFlat"\n'
        'parentFileNameHint="fifo"\nRW 8 FLAT "flat.raw" 0\n'
    )
    got = _bounded(top, desc, delta, ops="extents")
    for path in (top, desc, delta):
        assert "not a regular file" in got[str(path)]["open"], got
        assert str(home / "fifo") in got[str(path)]["open"], got


def _ova_with_qcow2(path: Path, disk: Path) -> Path:
    from hypersdk.models import DiskInfo, VMInfo
    from hypersdk.ovf import DiskFile, build_ovf

    info = DiskInfo(name="disk0", capacity=MiB, controller="scsi0")
    vm = VMInfo(name="vm", id="vm", disks=[info])
    ovf = build_ovf(vm, [DiskFile(info, "disk.qcow2", "file1", "vmdisk1", format="qcow2")])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("vm.ovf", ovf), ("disk.qcow2", disk.read_bytes())):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    return path


def test_ova_member_may_not_name_a_backing_file(home):
    """A qcow2 inside an OVA names 'base.qcow2', which does exist next to the OVA: an image
    that is not a local file may refer to no file at all."""
    _raw(home / "secret.raw", MiB, {0: SECRET})
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", home / "secret.raw", home / "base.qcow2")
    member = _delta(home / "member.qcow2", "base.qcow2")
    ova = _ova_with_qcow2(home / "x.ova", member)
    err = _refused(ova, "x.ova:disk.qcow2", "base.qcow2", "not a local file")
    assert "backing file" in str(err)


def test_legit_chain_and_repository_chain_still_open(home, tmp_path):
    base_raw = _raw(home / "base.raw", MiB, {0: b"base data", 512 * 1024: b"more"})
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, home / "base.qcow2")
    top = _delta(home / "top.qcow2", "base.qcow2")
    with open_image(top) as img:
        assert img.read(0, 9) == b"base data" and img.backing is not None
    # a repository: exports/vm/<id>/manifest.json + disk0.qcow2, the delta naming its base
    repo = tmp_path / "exports" / "vm"
    first, second = repo / "20250101T000000", repo / "20250102T000000"
    for d in (first, second):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, first / "disk0.qcow2")
    delta = _delta(second / "disk0.qcow2", f"../{first.name}/disk0.qcow2")
    with open_image(delta) as img:
        assert img.read(512 * 1024, 4) == b"more"
    # the same chain without the base's manifest is no repository chain: refused
    (first / "manifest.json").unlink()
    _refused(delta, f"../{first.name}/disk0.qcow2")


def test_allow_backing_outside_and_printable_names(home, outside):
    top = _delta(home / "abs.qcow2", str(outside / "base.qcow2"))
    res = _hyperctl("info", top)
    assert res.returncode != 0 and str(outside / "base.qcow2") in res.stderr
    assert "--allow-backing-outside" in res.stderr
    with open_image(top, policy=ReferencePolicy(allow_outside=True)) as img:
        assert SECRET in img.read(0, 4096)
    out = home / "flat.raw"
    res = _hyperctl("convert", "-q", "--allow-backing-outside", top, out, "-O", "raw")
    assert res.returncode == 0, res.stderr
    qemu.compare(outside / "secret.raw", out, "raw", "raw")
    res = _hyperctl("check", "--allow-backing-outside", top)
    assert res.returncode == 0 and "no errors" in res.stdout, res.stdout + res.stderr
    # a backing name carrying an escape sequence never reaches the terminal raw
    evil = "\x1b[31mred.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", outside / "secret.raw", home / evil)
    named = _delta(home / "named.qcow2", evil)
    res = _hyperctl("info", named)
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\\x1b[31mred.qcow2" in res.stdout
    gone = _delta(home / "gone.qcow2", "\x1b]0;pwned\x07gone.qcow2")
    res = _hyperctl("info", gone)
    assert res.returncode != 0 and "\x1b" not in res.stderr and "\x07" not in res.stderr
    assert "\\x1b]0;pwned\\x07gone.qcow2" in res.stderr


# ------------------------------------------------------------------ 3. bounded by file size
CHILD = """
import json, sys
from hypersdk.errors import FormatError
from hypersdk.formats import open_image
ops, out = sys.argv[1].split(","), {}
for path in sys.argv[2:]:
    got = out[path] = {}
    try:
        img = open_image(path)
    except FormatError as exc:
        got["open"] = "error: " + str(exc)
        continue
    with img:
        for op in ops:
            try:
                if op == "extents":
                    got[op] = img.extents().data_bytes
                elif op == "info":
                    got[op] = img.own_extents().defined_bytes, img.info()
                elif op == "check":
                    got[op] = img.check()
                elif op == "read":
                    got[op] = len(img.read(0, min(img.virtual_size, 1 << 20)))
            except FormatError as exc:
                got[op] = "error: " + str(exc)
print(json.dumps(out))
"""
MEMORY = 768 * MiB  # the interpreter, numpy and two threads need ~350 MiB of address space
TIMEOUT = 30  # the fixed readers answer in about a second (mostly interpreter start)


def _bounded(*paths: Path, ops: str = "extents,info,check") -> dict:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    try:
        res = subprocess.run(
            [sys.executable, "-c", CHILD, ops, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=limit,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {paths} took more than {TIMEOUT} s")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr
    return json.loads(res.stdout)


def _qcow2(path: Path, vsize: int, l1_entry, l2_entries: np.ndarray, bits: int = 16) -> Path:
    """A 10 MiB qcow2 by hand: header, L1 (``l1_entry(i)`` for each entry), refcount table and
    block, then L2 tables (``l2_entries``: one row per table), then data."""
    cs = 1 << bits
    l1_size = Q.ceil_div(Q.ceil_div(vsize, cs), cs // 8)
    l1_at = cs
    rt_at = l1_at + -(-l1_size * 8 // cs) * cs
    l2_at = rt_at + 2 * cs
    data_at = l2_at + len(l2_entries) * cs
    h = Q.Header(3, 0, 0, bits, vsize, 0, l1_size, l1_at, rt_at, 1, 0, 0, header_length=112)
    buf = bytearray(max(10 * MiB, data_at + cs))
    buf[:120] = h.pack() + Q.EXTENSION.pack(Q.EXT_END, 0)
    l1 = np.array([l1_entry(i, l2_at, cs) for i in range(l1_size)], dtype=">u8")
    buf[l1_at : l1_at + l1.nbytes] = l1.tobytes()
    buf[rt_at : rt_at + 8] = struct.pack(">Q", rt_at + cs)
    tables = np.asarray(l2_entries, dtype=np.uint64)
    tables = np.where(tables == 0, 0, tables + np.uint64(data_at))  # entries relative to data
    buf[l2_at:data_at] = tables.astype(">u8").tobytes()
    buf[data_at : data_at + 5] = b"hello"
    path.write_bytes(bytes(buf))
    return path


def test_qcow2_l1_entries_sharing_one_l2_table(tmp_path):
    """The known case: 10 MiB whose every L1 entry names one L2 table whose entries all name
    one cluster. The old reader took 4.5 s per TiB to walk it (qemu-img info: 0.02 s)."""
    E = 8192
    table = np.full((1, E), Q.OFLAG_COPIED, dtype=np.uint64)
    p = _qcow2(tmp_path / "l1.qcow2", 16 << 40, lambda i, l2, cs: l2 | Q.OFLAG_COPIED, table)
    got = _bounded(p)[str(p)]
    assert "both point to the L2 table" in got["open"], got


def test_qcow2_l2_entries_sharing_one_cluster(tmp_path):
    """Distinct L2 tables, every entry the same data cluster (or the same compressed blob):
    1,000 times the file's clusters. Refused by every whole-disk walk, fast."""
    n_tables, E = 100, 8192
    std = np.full((n_tables, E), Q.OFLAG_COPIED, dtype=np.uint64)
    x, _ = Q.compressed_fields(16)
    comp = np.full((n_tables, E), Q.OFLAG_COMPRESSED, dtype=np.uint64)  # offset 0, 1 sector

    def l1(i, l2, cs):
        return (l2 + i * cs) | Q.OFLAG_COPIED if i < n_tables else 0

    paths = [
        _qcow2(tmp_path / "std.qcow2", n_tables * E << 16, l1, std),
        _qcow2(tmp_path / "comp.qcow2", n_tables * E << 16, l1, comp),
    ]
    got = _bounded(*paths)
    for p in paths:
        for op in ("extents", "info"):
            assert "clusters are shared" in got[str(p)][op], got
        assert any("clusters are shared" in c for c in got[str(p)]["check"]), got


def _snapshot_table(path: Path, count: int, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", count, offset))


def test_qcow2_bogus_snapshot_tables(tmp_path):
    """nb_snapshots past the end of the file, or past qemu's 65536: check says so (as qemu-img
    check does), quickly, where it used to say "no errors found"."""
    past, huge, legit = (tmp_path / f"{n}.qcow2" for n in ("past", "huge", "legit"))
    for p in (past, huge, legit):
        _qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    _snapshot_table(past, 5, 1 << 30)
    _snapshot_table(huge, 0xFFFFFFFF, 3 << 16)
    for name in ("one", "two"):  # a real table: its last entry's padding lies past the end
        _qemu_img("snapshot", "-c", name, legit)
    got = _bounded(past, huge, legit, ops="check")
    assert got[str(legit)]["check"] == [], got
    assert any("beyond the end of the file" in c for c in got[str(past)]["check"]), got
    assert any("snapshot table too large" in c for c in got[str(huge)]["check"]), got
    for p in (past, huge):
        assert qemu.run("check", "-f", "qcow2", str(p)).returncode != 0  # qemu agrees


def _vmdk(path: Path, gd: np.ndarray, gts: np.ndarray, capacity: int, size: int = 10 * MiB):
    """A monolithicSparse VMDK by hand: header, GD at sector 1, the GTs, then one grain.
    GD and GT entries are relative: GD to the first GT sector, GT to the grain's sector."""
    gd_sectors = -(-len(gd) * 4 // 512)
    gt_at = 1 + gd_sectors
    grain_at = gt_at + 4 * len(gts)
    h = V.SparseHeader(
        version=1, flags=V.FLAG_NL_DETECT, capacity=capacity, grain_size=128,
        descriptor_offset=0, descriptor_size=0, num_gtes_per_gt=512, rgd_offset=0,
        gd_offset=1, overhead=grain_at,
    )  # fmt: skip
    buf = bytearray(max(size, (grain_at + 128) * 512))
    buf[:512] = h.pack()
    buf[512 : 512 + len(gd) * 4] = (gd + gt_at).astype("<u4").tobytes()
    buf[gt_at * 512 : grain_at * 512] = (gts + grain_at).astype("<u4").tobytes()
    buf[grain_at * 512 : grain_at * 512 + 5] = b"grain"
    path.write_bytes(bytes(buf))
    return path


def test_vmdk_directory_entries_sharing_one_table(tmp_path):
    """2 Mi directory entries (8 MiB) all naming one grain table: 64 TiB posing as data."""
    n = 2 * 1024 * 1024
    p = _vmdk(tmp_path / "gd.vmdk", np.zeros(n, np.int64), np.zeros((1, 512), np.int64), n << 16)
    got = _bounded(p)[str(p)]
    assert "both point to the grain table" in got["open"], got


def test_vmdk_tables_sharing_one_grain(tmp_path):
    """4096 distinct grain tables whose every entry names one grain: 128 GiB of 'data' in a
    10 MiB file; the old reader reported it all, and check called it clean."""
    n = 4096
    p = _vmdk(tmp_path / "gt.vmdk", np.arange(n) * 4, np.zeros((n, 512), np.int64), n * 512 * 128)
    got = _bounded(p)[str(p)]
    assert "grains are shared" in got["extents"] and "grains are shared" in got["info"], got
    assert any("grains are shared" in c for c in got["check"]), got


def test_vmdk_descriptor_reusing_one_file(tmp_path):
    """A 1 MiB descriptor naming one flat file (or one sparse file) 30,000 times: refused
    before it opens 30,000 extents, and never an fd or table cache per line."""
    flat = _raw(tmp_path / "f-flat.vmdk", MiB, {0: b"data"})
    lines = ["# Disk DescriptorFile", 'createType="monolithicFlat"']
    flat_desc = tmp_path / "flat.vmdk"
    flat_desc.write_text("\n".join(lines + ['RW 2048 FLAT "f-flat.vmdk" 0'] * 30000) + "\n")
    convert_file(flat, tmp_path / "s.vmdk", "vmdk")
    sparse_desc = tmp_path / "sparse.vmdk"
    lines[1] = 'createType="twoGbMaxExtentSparse"'
    sparse_desc.write_text("\n".join(lines + ['RW 2048 SPARSE "s.vmdk"'] * 30000) + "\n")
    got = _bounded(flat_desc, sparse_desc)
    for p in (flat_desc, sparse_desc):
        assert "backs the same bytes of the disk twice" in got[str(p)]["open"], got


# ------------------------------------------------------------------ 4. check reads the data
def test_qcow2_check_finds_corrupt_compressed_cluster(tmp_path):
    text = b"".join(b"line %d of some text\n" % i for i in range(200_000))[: 3 * MiB]
    raw = _raw(tmp_path / "t.raw", 4 * MiB, {0: text})
    image = tmp_path / "c.qcow2"
    convert_file(raw, image, "qcow2", options={"compression": "zlib"})
    with open_image(image) as img:
        assert img.check() == []
        comp = [s for s in img._walk() if s[0] == Q.COMP]
        off, _ = img._compressed_span(comp[3][3])
    with open(image, "r+b") as f:
        f.seek(off)
        f.write(b"\x06")  # a raw deflate block of the reserved type 3: never valid
    assert qemu.run("check", "-f", "qcow2", str(image)).returncode == 0  # qemu never reads data
    res = _hyperctl("check", image)
    assert res.returncode != 0, res.stdout
    assert f"guest offset {comp[3][1] * 65536}" in res.stdout and "corrupt" in res.stdout


@pytest.fixture
def stream_vmdk(tmp_path) -> tuple[Path, list[int]]:
    """A streamOptimized VMDK of ours and the sectors of its first grains' markers."""
    text = b"".join(b"row %d: some log text\n" % i for i in range(100_000))[: 2 * MiB]
    raw = _raw(tmp_path / "t.raw", 2 * MiB, {0: text})
    image = tmp_path / "s.vmdk"
    convert_file(raw, image, "vmdk", options={"subformat": "streamOptimized"})
    with open_image(image) as img:
        assert img.check() == []
        sp = img.parts[0].sparse
        sectors = [int(s) for s in sp._gt(0)[:4]]
    return image, sectors


def test_vmdk_check_finds_corrupt_grain_and_wrong_marker(stream_vmdk):
    image, sectors = stream_vmdk
    data = bytearray(image.read_bytes())
    data[sectors[1] * 512 + 12 : sectors[1] * 512 + 14] = b"\0\0"  # not a zlib header
    struct.pack_into("<Q", data, sectors[2] * 512, 999 * 128)  # marker for another grain
    image.write_bytes(bytes(data))
    with open_image(image) as img:
        problems = img.check()
    assert any("grain 1 does not inflate" in p for p in problems), problems
    assert any("is for lba 127872, not grain 2" in p for p in problems), problems
    assert _hyperctl("check", image).returncode != 0


def test_vmdk_check_finds_a_missing_table_marker(stream_vmdk):
    image, _ = stream_vmdk
    with open_image(image) as img:
        gt_sector = int(img.parts[0].sparse.gd[0])
    data = bytearray(image.read_bytes())
    struct.pack_into("<QII", data, (gt_sector - 1) * 512, 4, 0, V.MARKER_GD)
    image.write_bytes(bytes(data))
    with open_image(image) as img:
        assert img.read(0, 4096)  # the reader needs no marker; check notices
        assert any("grain table 0" in p and "marker" in p for p in img.check())


# --------------------------------------------------------------------------- 5. info on a delta
def _map_data(path: Path) -> int:
    res = qemu.run("map", "--output=json", str(path))
    return sum(e["length"] for e in json.loads(res.stdout) if e["data"] and e["depth"] == 0)


def test_info_reports_each_layer_of_a_chain(home):
    need_tool("qemu-io")
    base_raw = _raw(home / "base.raw", 64 * MiB, {i * MiB: os.urandom(MiB) for i in range(50)})
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, home / "base.qcow2")
    top = _delta(home / "top.qcow2", "base.qcow2", size="64M")
    res = subprocess.run(
        [need_tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0xab 0 3M", "-c",
         "write -P 0x11 40M 64k", str(top)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = _hyperctl("info", "--json", top)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["allocated_bytes"] == _map_data(top) == 3 * MiB + 64 * 1024
    chain = json.loads(qemu.run("info", "--backing-chain", "--output=json", str(top)).stdout)
    assert [c["virtual_size"] for c in info["backing_chain"]] == [
        c["virtual-size"] for c in chain[1:]
    ]
    (base,) = info["backing_chain"]
    assert base["filename"] == str((home / "base.qcow2").resolve())
    assert base["allocated_bytes"] == _map_data(home / "base.qcow2") == 50 * MiB
    text = _hyperctl("info", top).stdout
    assert "allocated: 3.1 MiB (3211264 bytes)" in text
    assert f"\n\nimage: {(home / 'base.qcow2').resolve()}\n" in text


# ---------------------------------------------------------------------- 6. refused by name
@pytest.mark.parametrize(
    ("create_type", "extent"),
    [
        ("vmfsSparse", 'RW 8 VMFSSPARSE "x-delta.vmdk"'),
        ("custom", 'RW 8 FLAT "x-flat.vmdk" 0'),
        ("monolithicFlat", 'RW 8 VMFSSPARSE "x-delta.vmdk"'),
        ("vmfs", 'RW 8 VMFSRDM "x-rdm.vmdk"'),
        ("vmfsRaw", 'RW 8 VMFSRAW "x-rdm.vmdk"'),
    ],
)
def test_vmdk_kinds_we_do_not_read_are_refused_by_name(tmp_path, create_type, extent):
    for name in ("x-delta.vmdk", "x-flat.vmdk", "x-rdm.vmdk"):
        _raw(tmp_path / name, 4096, {})
    desc = tmp_path / "d.vmdk"
    desc.write_text(f'# Disk DescriptorFile\nversion=1\ncreateType="{create_type}"\n{extent}\n')
    with pytest.raises(UnsupportedFormatError) as err:
        open_image(desc).close()
    kind = extent.split()[2]
    named = create_type if create_type not in ("monolithicFlat", "vmfs") else kind
    assert named in str(err.value) and str(desc) in str(err.value)


def test_cowd_extent_is_refused_not_read_as_raw(tmp_path):
    cowd = tmp_path / "x-delta.vmdk"
    cowd.write_bytes(b"COWD" + struct.pack("<II", 1, 3) + bytes(4096))
    with pytest.raises(UnsupportedFormatError, match="COWD"):
        open_image(cowd).close()
