"""The local provider: VM descriptions, snapshots (reflink or checked stop), block-hash CBT."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from hypersdk.errors import DiskReadError, FormatError, SnapshotError, SourceError, VMNotFoundError
from hypersdk.extents import Extent
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers import open_source
from providers.sources.local import _reflink, create_vm
from tests import qemu
from tests.fixtures.tools import need_tool

MiB = 1024 * 1024


@pytest.fixture
def vm_root(tmp_path):
    root = tmp_path / "vms"
    d = create_vm(root, "web01", {"disk0": 8 * MiB, "disk1": 2 * MiB + 4096})
    write_realistic_disk(d / "disk0.img", 8 * MiB, seed=7)
    return root


def test_list_and_describe(vm_root):
    src = open_source(f"local://{vm_root}")
    (vm,) = src.list_vms()
    assert vm.name == "web01" and [d.name for d in vm.disks] == ["disk0", "disk1"]
    assert vm.disks[1].capacity == 2 * MiB + 4096 and vm.nics[0].adapter == "vmxnet3"
    with pytest.raises(VMNotFoundError, match="nosuch"):
        src.get_vm("nosuch")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(vm_root / "missing")).list_vms()


def test_bad_description_is_a_clear_error(vm_root):
    (vm_root / "web01" / "vm.json").write_text(json.dumps({"name": "web01", "cpus": 0}))
    with pytest.raises(SourceError, match="cpus"):
        open_source(str(vm_root)).list_vms()


def test_snapshot_cbt_full_then_delta(vm_root):
    src = open_source(str(vm_root))
    disk = src.get_vm("web01").disks[0]
    with src.snapshot("web01") as s1:
        full = src.changed_extents(s1, disk, None)
        assert not full.incremental and full.extents.data_bytes > 0
        # a full export records the change state through the tracker (here nothing was
        # observed, so its commit scans the snapshot); only then is s1.id usable
        tracker = src.change_tracker(s1, disk, full)
        tracker.commit()
        assert src.change_tracker(s1, disk, full) is None  # recorded: nothing left to track
        with src.open_disk(s1, disk) as img:
            assert img.read(0, 4096) == (vm_root / "web01/disk0.img").read_bytes()[:4096]
    assert not os.path.exists(s1.provider_data["snap_dir"])
    changed = mutate_disk(vm_root / "web01/disk0.img", 5, seed=3)
    with src.snapshot("web01") as s2:
        delta = src.changed_extents(s2, disk, s1.id)
    assert delta.incremental and delta.since == s1.id
    expected = {off for off in changed}
    assert {e.offset for e in delta.extents.split(64 * 1024)} == expected
    # an unknown change id falls back to a full export and says so
    with src.snapshot("web01") as s3:
        again = src.changed_extents(s3, disk, "no-such-change-id")
    assert not again.incremental and "full export" in again.note
    assert again.extents == full.extents.__class__(again.extents.size, list(again.extents))


def test_running_vm_needs_reflink(vm_root, tmp_path):
    vm_json = vm_root / "web01" / "vm.json"
    vm_json.write_text(vm_json.read_text().replace('"poweredOff"', '"poweredOn"'))
    src = open_source(str(vm_root))
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    if _reflink(probe, tmp_path / "probe2"):
        with src.snapshot("web01") as snap:
            assert snap.consistency == "clone"
    else:
        with pytest.raises(SnapshotError, match="stop the VM"):
            src.create_snapshot("web01")
        assert not list((vm_root / "web01/.hypersdk/snapshots").iterdir())


def test_disk_changed_during_export_is_detected(vm_root):
    src = open_source(str(vm_root))
    with src.snapshot("web01") as snap:
        if snap.consistency == "clone":
            pytest.skip("reflink filesystem: the snapshot is a real clone")
        src.verify_snapshot(snap)  # untouched: fine
        mutate_disk(vm_root / "web01/disk0.img", 1, seed=1)
        with pytest.raises(SnapshotError, match="changed while it was exported"):
            src.verify_snapshot(snap)


def test_missing_and_unreadable_disk(vm_root):
    os.unlink(vm_root / "web01" / "disk1.img")
    src = open_source(str(vm_root))
    with pytest.raises(DiskReadError, match="disk1"):
        src.create_snapshot("web01")
    assert not list((vm_root / "web01/.hypersdk/snapshots").iterdir())


def test_extents_are_block_aligned_and_within_disk(vm_root):
    src = open_source(str(vm_root))
    disk = src.get_vm("web01").disks[1]
    with src.snapshot("web01") as snap:
        with open(snap.provider_data["files"]["disk1"], "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"tail")
        ch = src.changed_extents(snap, disk, None)
    assert list(ch.extents) == [Extent(2 * MiB, 4096)]


# --- hostile VM directories -------------------------------------------------------------------

MARK = b"HOST-SECRET-BYTES-" * 64


def _set_disk(vm_dir, index: int, **fields) -> None:
    """Edit one disk of vm.json (None removes a field)."""
    desc = json.loads((vm_dir / "vm.json").read_text())
    for key, value in fields.items():
        if value is None:
            desc["disks"][index].pop(key, None)
        else:
            desc["disks"][index][key] = value
    (vm_dir / "vm.json").write_text(json.dumps(desc))


def _export_attempt(url: str, out_dir) -> Exception | None:
    """What an export does with the source: snapshot, then read every disk into ``out_dir``."""
    src = open_source(url)
    out_dir.mkdir(exist_ok=True)
    try:
        with src.snapshot("web01") as snap:
            for sd in snap.disks:
                with src.open_disk(snap, sd.disk) as img:
                    (out_dir / f"{sd.disk.name}.raw").write_bytes(img.read(0, img.size))
    except Exception as exc:  # noqa: BLE001 - the caller checks which
        return exc
    return None


def _files_holding(root, needle: bytes, skip=()) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if path in skip or os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
    return found


@pytest.fixture
def secret(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.bin"
    path.write_bytes(MARK + os.urandom(4096) + MARK)
    return path


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "symlinked-dir"])
def test_disk_outside_the_vm_directory_is_refused(vm_root, secret, tmp_path, how):
    vm_dir = vm_root / "web01"
    if how == "relative":
        _set_disk(vm_dir, 1, backing="../../outside/secret.bin")
    elif how == "absolute":
        _set_disk(vm_dir, 1, backing=str(secret))
    elif how == "symlink":
        os.unlink(vm_dir / "disk1.img")
        os.symlink(secret, vm_dir / "disk1.img")
    else:
        os.symlink(secret.parent, vm_dir / "disks")
        _set_disk(vm_dir, 1, backing="disks/secret.bin")
    out = tmp_path / "out"
    exc = _export_attempt(f"local://{vm_root}", out)
    assert isinstance(exc, FormatError), exc
    assert str(secret) in str(exc) and "allow_outside=true" in str(exc)
    assert "\n" not in str(exc)
    assert _files_holding(tmp_path, MARK, skip={str(secret)}) == []
    assert not list((vm_dir / ".hypersdk/snapshots").iterdir())


@pytest.mark.parametrize("host_file", ["/etc/passwd", "/etc/shadow"])
def test_host_files_are_refused(vm_root, tmp_path, host_file):
    if not os.path.isfile(host_file):
        pytest.skip(f"{host_file} does not exist here")
    _set_disk(vm_root / "web01", 1, backing=host_file)
    out = tmp_path / "out"
    exc = _export_attempt(str(vm_root), out)
    assert isinstance(exc, FormatError) and host_file in str(exc), exc
    assert list(out.iterdir()) == []


def test_allow_outside_is_an_explicit_opt_in(vm_root, secret, tmp_path):
    _set_disk(vm_root / "web01", 1, backing=str(secret), capacity=secret.stat().st_size)
    assert _export_attempt(f"local://{vm_root}?allow_outside=true", tmp_path / "out") is None
    assert (tmp_path / "out" / "disk1.raw").read_bytes() == secret.read_bytes()
    src = open_source(str(vm_root), allow_outside=True)
    assert src.url.endswith("?allow_outside=true")


def test_fifo_disk_is_refused_without_waiting(vm_root):
    vm_dir = vm_root / "web01"
    os.unlink(vm_dir / "disk1.img")
    os.mkfifo(vm_dir / "disk1.img")
    with pytest.raises(FormatError, match="not a regular file"):
        open_source(str(vm_root)).create_snapshot("web01")
    assert not list((vm_dir / ".hypersdk/snapshots").iterdir())


def _guest_written_qcow2_header(vm_dir, tmp_path) -> bytes:
    """A raw disk whose guest wrote a qcow2 header naming ``secret.bin`` as its backing file."""
    qemu_img = need_tool("qemu-img")
    (vm_dir / "secret.bin").write_bytes(MARK * 8)
    header = tmp_path / "hdr.qcow2"
    subprocess.run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "secret.bin",
            "-F",
            "raw",
            str(header),
            "64K",
        ],
        check=True,
        timeout=60,
    )
    disk = vm_dir / "disk0.img"
    data = bytearray(disk.read_bytes())
    blob = header.read_bytes()
    data[: len(blob)] = blob
    disk.write_bytes(bytes(data))
    return bytes(data)


def test_raw_disk_is_never_probed_as_a_container(vm_root, tmp_path):
    vm_dir = vm_root / "web01"
    raw = _guest_written_qcow2_header(vm_dir, tmp_path)
    _set_disk(vm_dir, 0, format=None)  # vm.json does not say what disk0 is
    exc = _export_attempt(str(vm_root), tmp_path / "out")
    assert isinstance(exc, FormatError), exc
    assert '"format"' in str(exc) and "qcow2" in str(exc) and "disk0" in str(exc)
    assert _files_holding(tmp_path / "out", MARK) == []
    # declared raw, it is exported as the guest wrote it, header and all
    _set_disk(vm_dir, 0, format="raw")
    assert _export_attempt(str(vm_root), tmp_path / "out2") is None
    assert (tmp_path / "out2" / "disk0.raw").read_bytes() == raw
    qemu.compare(vm_dir / "disk0.img", tmp_path / "out2" / "disk0.raw", "raw", "raw")
    # and a disk without "format" whose bytes are plainly raw is still exported as raw
    write_realistic_disk(vm_dir / "disk0.img", 8 * MiB, seed=9)
    _set_disk(vm_dir, 0, format=None)
    assert _export_attempt(str(vm_root), tmp_path / "out3") is None
    assert (tmp_path / "out3/disk0.raw").read_bytes() == (vm_dir / "disk0.img").read_bytes()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[]", "JSON object"),
        (b'{"name": "web01", "disks": [', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"{}" + b" " * (1024 * 1024), "larger than"),
        (
            b'{"name": "x", "disks": [{"name": "d", "capacity": 1}, {"name": "d", "capacity": 1}]}',
            "not unique",
        ),
    ],
)
def test_bad_vm_json_is_one_line(vm_root, content, needle):
    (vm_root / "web01" / "vm.json").write_bytes(content)
    with pytest.raises(SourceError, match=needle) as exc:
        open_source(str(vm_root)).list_vms()
    assert "\n" not in str(exc.value) and "vm.json" in str(exc.value)


def _full_export_maps(url: str, disk_index: int = 0) -> None:
    src = open_source(url)
    disk = src.get_vm("web01").disks[disk_index]
    with src.snapshot("web01") as snap:
        changes = src.changed_extents(snap, disk, None)
        src.change_tracker(snap, disk, changes).commit()


def _victims(directory, count: int = 10) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"20200101T00000{i}Z-0000000{i}.bmap" for i in range(count)]
    for p in paths:
        p.write_bytes(b"someone else's change map")
    return paths


def test_disk_name_cannot_move_change_maps(vm_root, tmp_path):
    vm_dir = vm_root / "web01"
    evil = "../../../../victim"  # from <vm>/.hypersdk/cbt/ that is tmp_path/victim
    _set_disk(vm_dir, 0, name=evil, backing="disk0.img")
    victims = _victims(tmp_path / "victim")
    _full_export_maps(str(vm_root))
    assert all(p.read_bytes() == b"someone else's change map" for p in victims)
    assert sorted(os.listdir(tmp_path / "victim")) == sorted(p.name for p in victims)
    (disk_dir,) = (vm_dir / ".hypersdk/cbt").iterdir()  # one component, inside the VM
    assert len(list(disk_dir.glob("*.bmap"))) == 1


def test_change_maps_never_go_through_a_symlink(vm_root, tmp_path):
    vm_dir = vm_root / "web01"
    victims = _victims(tmp_path / "elsewhere" / "disk0")
    (vm_dir / ".hypersdk").mkdir(exist_ok=True)
    os.symlink(tmp_path / "elsewhere", vm_dir / ".hypersdk" / "cbt")
    with pytest.raises(SourceError, match="symlink"):
        _full_export_maps(str(vm_root))
    assert sorted(os.listdir(tmp_path / "elsewhere" / "disk0")) == sorted(p.name for p in victims)


def test_malformed_change_id_is_a_full_export(vm_root):
    src = open_source(str(vm_root))
    disk = src.get_vm("web01").disks[0]
    with src.snapshot("web01") as snap:
        changes = src.changed_extents(snap, disk, "../../../../victim/x")
    assert not changes.incremental and "malformed" in changes.note


def test_the_snapshot_of_a_killed_run_is_removed_by_the_next_one_a_live_one_is_not(vm_root):
    """SIGKILL leaves a run no chance to remove its snapshot directory: the next snapshot of
    the VM removes it (its run's lock died with it), never one a live run still holds."""
    import signal
    import sys

    hold = (
        "import sys, time\n"
        "from providers import open_source\n"
        "snap = open_source(sys.argv[1]).create_snapshot('web01')\n"
        "print(snap.provider_data['snap_dir'], flush=True)\n"
        "time.sleep(600)\n"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", hold, f"local://{vm_root}"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        killed, live = (run.stdout.readline().strip() for run in runs)
        assert os.path.isdir(killed) and os.path.isdir(live)
        runs[0].send_signal(signal.SIGKILL)
        runs[0].wait(timeout=30)
        src = open_source(f"local://{vm_root}")
        with src.snapshot("web01") as snap:
            assert not os.path.exists(killed)  # the dead run's snapshot is gone
            assert os.path.isdir(live)  # the live run's is untouched
            assert os.path.isdir(snap.provider_data["snap_dir"])
        assert not os.path.exists(snap.provider_data["snap_dir"])
    finally:
        for run in runs:
            run.kill()
            run.wait(timeout=30)
    # once its run is gone too, the next snapshot removes the other one
    with open_source(f"local://{vm_root}").snapshot("web01"):
        assert not os.path.exists(live)
