"""The local provider: VM descriptions, snapshots (reflink or checked stop), block-hash CBT."""

from __future__ import annotations

import json
import os

import pytest

from hypersdk.errors import DiskReadError, SnapshotError, SourceError, VMNotFoundError
from hypersdk.extents import Extent
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from providers import open_source
from providers.sources.local import _reflink, create_vm

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
