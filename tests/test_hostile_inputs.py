"""Hostile inputs outside the format drivers: VM descriptions and change maps that would hang or
exhaust the reader, manifests planted on a target, and a planted file at atomic output's
temporary name. DoS cases run in a child process under a memory limit and a timeout."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from hypersdk import atomic
from hypersdk.atomic import atomic_file, write_bytes_atomic
from hypersdk.errors import FormatError, TargetError, VerificationError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver
from hypersdk.imagegen import write_realistic_disk
from hypersdk.io import FileRangeReader
from hypersdk.manifest import DiskManifest, ExportManifest, hash_chunks
from hypersdk.models import VMInfo
from hypersdk.verify import verify_export
from providers.sources.local import create_vm
from providers.targets.local import LocalTarget

MiB = 1024 * 1024
HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))
LIMIT = 1 << 30  # address space of a child: far below what an unbounded parse would take


def run_child(code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter limited to LIMIT bytes of address space."""
    prelude = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


LIST_VMS = (
    "from providers import open_source\n"
    "from hypersdk.errors import SourceError\n"
    "try:\n"
    "    open_source(sys.argv[1]).list_vms()\n"
    "except SourceError as exc:\n"
    "    print('refused:', exc)\n"
)


@pytest.fixture
def vm_root(tmp_path):
    root = tmp_path / "vms"
    create_vm(root, "web01", {"disk0": 4 * MiB})
    return root


# --- VM descriptions and change maps --------------------------------------------------------


def test_deeply_nested_vm_json_is_one_line(vm_root):
    (vm_root / "web01" / "vm.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    res = run_child(LIST_VMS, vm_root)
    assert res.returncode == 0 and res.stdout.startswith("refused:"), res.stdout + res.stderr
    assert len(res.stdout.splitlines()) == 1 and "vm.json" in res.stdout
    assert "Traceback" not in res.stderr


def test_an_absurd_disk_size_is_refused_before_anything_is_planned(vm_root):
    """A vm.json (or a cloud API) claiming a 2**70-byte disk: refused at the description, in
    one line, under the memory limit (no map or table is ever sized by it)."""
    path = vm_root / "web01" / "vm.json"
    desc = json.loads(path.read_text())
    desc["disks"][0]["capacity"] = 2**70
    path.write_text(json.dumps(desc))
    res = run_child(LIST_VMS, vm_root)
    assert res.returncode == 0 and res.stdout.startswith("refused:"), res.stdout + res.stderr
    assert "capacity" in res.stdout and len(res.stdout.splitlines()) == 1, res.stdout


def test_vm_json_fifo_does_not_hang(vm_root):
    """Listing skips a directory whose vm.json is no file; reading one directly must not wait
    for a writer either."""
    vm_json = vm_root / "web01" / "vm.json"
    vm_json.unlink()
    os.mkfifo(vm_json)
    code = (
        "from pathlib import Path\n"
        "from providers.sources.local import load_vm\n"
        "from hypersdk.errors import SourceError\n"
        "try:\n"
        "    load_vm(Path(sys.argv[1]))\n"
        "except SourceError as exc:\n"
        "    print('refused:', exc)\n"
    )
    res = run_child(code, vm_root / "web01", timeout=30)
    assert res.returncode == 0 and "not a regular file" in res.stdout, res.stdout + res.stderr


def test_planted_fifo_change_map_does_not_hang(vm_root):
    cbt = vm_root / "web01" / ".hypersdk" / "cbt" / "disk0"
    cbt.mkdir(parents=True)
    since = "20200101T000000Z-00000000"
    os.mkfifo(cbt / f"{since}.bmap")
    code = (
        "from providers import open_source\n"
        "src = open_source(sys.argv[1])\n"
        "disk = src.get_vm('web01').disks[0]\n"
        "with src.snapshot('web01') as snap:\n"
        "    print(src.changed_extents(snap, disk, sys.argv[2]).note)\n"
    )
    res = run_child(code, vm_root, since, timeout=30)
    assert res.returncode == 0 and "unreadable: full export" in res.stdout, res.stderr


# --- manifests --------------------------------------------------------------------------------


def _store_export(target: LocalTarget, vm: str, export_id: str, seed: int) -> DiskManifest:
    """A raw disk object on ``target`` and its honest manifest entry."""
    key = f"{vm}/{export_id}/disk0.raw"
    path = Path(target.path(key))
    path.parent.mkdir(parents=True)
    write_realistic_disk(path, 2 * MiB, seed=seed)
    with FileRangeReader(path) as reader:
        image = get_driver("raw").open(reader)
        chunks = hash_chunks(image, ExtentMap.full(image.size), 1 * MiB)
        size = image.size
    return DiskManifest(
        name="disk0",
        virtual_size=size,
        format="raw",
        key=key,
        object_size=size,
        object_blake3=blake3.blake3(path.read_bytes()).hexdigest(),
        data_bytes=size,
        defined_bytes=size,
        chunk_size=1 * MiB,
        chunks=chunks,
    )


def _manifest(vm: str, export_id: str, disks: list[DiskManifest]) -> ExportManifest:
    return ExportManifest(
        export_id=export_id,
        kind="full",
        source="local:///vms",
        vm=VMInfo(name=vm, id=vm),
        snapshot_id=export_id,
        snapshot_consistency="stopped",
        disks=disks,
    )


A_ID, B_ID = "20260101T000000Z-aaaaaaaa", "20260101T000000Z-bbbbbbbb"


@pytest.fixture
def target(tmp_path):
    t = LocalTarget(str(tmp_path / "exports"), cache="writeback")
    disk = _store_export(t, "vm-a", A_ID, seed=1)
    t.put_bytes(f"vm-a/{A_ID}/manifest.json", _manifest("vm-a", A_ID, [disk]).to_json())
    return t


def _put_raw(target, key: str, data: bytes) -> str:
    target.put_bytes(key, data)
    return key


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("disks"), "disks"),
        (lambda d: d["disks"][0].update(virtual_size="big"), "virtual_size"),
        (lambda d: d.update(schema="hypersdk.export/v99"), "hypersdk.export/v99"),
        (lambda d: d.pop("schema"), "no schema"),
        (lambda d: d["disks"][0].update(key="../../../../etc/passwd"), "'..'"),
        (lambda d: d["disks"][0].update(key="/etc/passwd"), "absolute"),
        (lambda d: d["disks"][0]["chunks"].reverse(), "out of order"),
        (lambda d: d["disks"][0]["chunks"][0].__setitem__(2, "not-a-hash"), "BLAKE3"),
    ],
)
def test_malformed_manifest_is_one_line_naming_it(target, mutate, needle):
    doc = json.loads(target.get_bytes(f"vm-a/{A_ID}/manifest.json"))
    mutate(doc)
    key = _put_raw(target, f"vm-a/{A_ID}/manifest.json", json.dumps(doc).encode())
    with pytest.raises(FormatError) as exc:
        verify_export(target, key)
    assert key in str(exc.value) and needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"[]", b"[" * 100_000, b'{"schema": 1'])
def test_not_a_manifest_at_all(target, content):
    key = _put_raw(target, f"vm-a/{A_ID}/manifest.json", content)
    with pytest.raises(FormatError, match="manifest") as exc:
        verify_export(target, key)
    assert key in str(exc.value)


def test_oversized_manifest_refused_before_reading(target, monkeypatch):
    import hypersdk.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 1000)
    reads = []
    real_open = target.open_reader

    def counting_open(key):
        reader = real_open(key)
        real_read = reader.read
        reader.read = lambda off, n: reads.append(n) or real_read(off, n)
        return reader

    monkeypatch.setattr(target, "open_reader", counting_open)
    with pytest.raises(FormatError, match="larger than 1000"):
        verify_export(target, f"vm-a/{A_ID}/manifest.json")
    assert reads == []


def test_manifest_may_not_name_another_exports_object(target):
    """A manifest planted in vm-a naming vm-b's object (inside the target, and consistent with
    it) is refused: verifying vm-a never reads anything but vm-a's export."""
    other = _store_export(target, "vm-b", B_ID, seed=2)
    key = f"vm-a/{A_ID}/manifest.json"
    (verdict,) = verify_export(target, key)  # the honest manifest verifies
    assert verdict.ok and verdict.chunks_checked == 2
    target.put_bytes(key, _manifest("vm-a", A_ID, [other]).to_json())
    with pytest.raises(VerificationError, match="outside the manifest's directory") as exc:
        verify_export(target, key)
    assert f"vm-b/{B_ID}/disk0.raw" in str(exc.value)


def test_chunks_past_the_disk_are_a_mismatch_not_a_read(target, tmp_path):
    """A manifest that claims a huge disk must not make verify read without end: hashed
    chunks past the stored image's end fail at once (in a child: the old code read forever)."""
    doc = json.loads(target.get_bytes(f"vm-a/{A_ID}/manifest.json"))
    disk = doc["disks"][0]
    size = disk["virtual_size"]
    disk["virtual_size"] = 1 << 60
    disk["chunk_size"] = 1 << 58
    disk["chunks"].append([size, 1 << 58, "0" * 64])
    key = _put_raw(target, f"vm-a/{A_ID}/manifest.json", json.dumps(doc).encode())
    code = (
        "from providers.targets.local import LocalTarget\n"
        "from hypersdk.verify import verify_export\n"
        "from hypersdk.errors import VerificationError\n"
        "try:\n"
        "    verify_export(LocalTarget(sys.argv[1]), sys.argv[2])\n"
        "except VerificationError as exc:\n"
        "    print('mismatch:', exc)\n"
    )
    res = run_child(code, target.root, key, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("mismatch:"), res.stdout + res.stderr
    assert f"first at offset {size}" in res.stdout


def test_hyperctl_verify_of_a_malformed_manifest_is_one_line(target):
    doc = json.loads(target.get_bytes(f"vm-a/{A_ID}/manifest.json"))
    doc["disks"][0]["object_size"] = "lots"
    key = _put_raw(target, f"vm-a/{A_ID}/manifest.json", json.dumps(doc).encode())
    res = subprocess.run(
        [HYPERCTL, "verify", key, "--target", target.root],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert key in lines[0] and "object_size" in lines[0] and "Traceback" not in res.stderr


# --- atomic output ----------------------------------------------------------------------------


def test_planted_symlink_at_the_old_temp_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "out.raw"
    os.symlink(victim, tmp_path / f".out.raw.partial-{os.getpid()}")  # the old, predictable name
    write_bytes_atomic(out, b"PLAINTEXT")
    assert victim.read_bytes() == b"precious\n"
    assert out.read_bytes() == b"PLAINTEXT" and not out.is_symlink()
    # a symlink at the final name is replaced by the rename, its target left alone
    out.unlink()
    os.symlink(victim, out)
    write_bytes_atomic(out, b"new")
    assert victim.read_bytes() == b"precious\n" and out.read_bytes() == b"new"
    assert not out.is_symlink()


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_existing_temp_name_is_never_opened(tmp_path, monkeypatch, planted):
    """Even at the random name (forced here), a planted symlink or file makes the open fail:
    O_EXCL|O_NOFOLLOW, nothing written through it, nothing truncated."""
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious\n")
    tmp = tmp_path / ".out.raw.partial-forced"
    if planted == "symlink":
        os.symlink(victim, tmp)
    else:
        tmp.write_bytes(b"someone's file")
    monkeypatch.setattr(atomic, "temp_name", lambda path: str(tmp))
    with pytest.raises(TargetError):
        write_bytes_atomic(tmp_path / "out.raw", b"PLAINTEXT")
    assert victim.read_bytes() == b"precious\n"
    assert not (tmp_path / "out.raw").exists()
    if planted == "file":
        assert tmp.read_bytes() == b"someone's file"


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_ctrl_c_right_after_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch, cache):
    """A KeyboardInterrupt can land between any two bytecodes: right after the create (here:
    while the sink is set up), the temporary file is removed all the same."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "FileSink", interrupted)
    monkeypatch.setattr(atomic, "DirectFileSink", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "out.qcow2", cache):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cache", ["writeback", "none", "unsafe"])
def test_temp_file_is_private_until_published_and_hidden(tmp_path, cache):
    target = LocalTarget(str(tmp_path), cache=cache)
    final = tmp_path / "vm" / "disk.raw"
    with atomic_file(final, cache) as sink:
        sink.write(b"secret plaintext")
        (tmp,) = [p for p in final.parent.iterdir() if ".partial-" in p.name]
        assert tmp.name.startswith(".disk.raw.partial-")
        assert str(os.getpid()) not in tmp.name.removeprefix(".disk.raw.partial-")
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
        assert [o.key for o in target.list()] == []  # an unfinished write is not an object
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o644 & ~umask
    assert [o.key for o in target.list()] == ["vm/disk.raw"]


def test_long_final_name_still_gets_a_temp_name(tmp_path):
    out = tmp_path / ("d" * 250)
    write_bytes_atomic(out, b"x")
    assert out.read_bytes() == b"x"
