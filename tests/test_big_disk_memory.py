"""Memory stays bounded whatever the disk size: a full then an incremental export of a 4 TiB
(sparse) disk through the engine and the local source, measured in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import qemu

TiB = 1024**4
MiB = 1024**2

# VmHWM: the child's own peak. ru_maxrss would start from the parent's at fork, and pytest's
# process is large once Prefect flows have run in it.
PEAK_RSS = textwrap.dedent(
    """
    def peak_rss_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")
    """
)

CHILD = PEAK_RSS + textwrap.dedent(
    """
    import json, os, sys
    from hypersdk.atomic import atomic_file
    from hypersdk.pipeline import export_stream
    from providers import open_source


    root, out_dir = sys.argv[1], sys.argv[2]
    src = open_source(root)
    disk = src.get_vm("big").disks[0]
    report = {}
    for run, since in (("full", None), ("delta", "from-full")):
        if since:
            live = os.path.join(root, "big", "disk0.img")
            with open(live, "r+b") as f:  # a guest write far out on the disk
                f.seek(3 * 1024**4 + 5 * 1024**2)
                f.write(b"changed!" * 1000)
            since = report["full_id"]
        with src.snapshot("big") as snap:
            changes = src.changed_extents(snap, disk, since)
            tracker = src.change_tracker(snap, disk, changes)
            options = {"backing_file": "full.qcow2", "backing_format": "qcow2"} if since else {}
            with src.open_disk(snap, disk) as reader, atomic_file(
                os.path.join(out_dir, run + ".qcow2")
            ) as sink:
                export_stream(reader, changes.extents, not since, "qcow2", sink, options,
                              observers=[tracker] if tracker else ())
            if tracker:
                tracker.commit()
        report[run + "_id"] = snap.id
        report[run + "_rss_mib"] = peak_rss_mib()
        report[run + "_incremental"] = changes.incremental
        report[run + "_bytes"] = changes.extents.data_bytes
    print(json.dumps(report))
    """
)


def _run_child(script: str, *args: object, timeout: int) -> dict:
    """Run ``script`` in a fresh interpreter (its own peak RSS) and return its JSON report."""
    res = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.timeout(600)
def test_four_tib_disk_full_and_incremental_in_bounded_memory(tmp_path, qemu_img):
    from providers.sources.local import create_vm

    size = 4 * TiB
    vm_root = tmp_path / "vms"
    try:
        create_vm(vm_root, "big", {"disk0": size})
    except OSError as exc:  # a filesystem without 4 TiB sparse files
        pytest.skip(f"cannot create a 4 TiB sparse file here: {exc}")
    live = vm_root / "big" / "disk0.img"
    with open(live, "r+b") as f:  # a little data scattered over the whole disk
        for i in range(64):
            f.seek(i * (size // 64) + 4096 * i)
            f.write(bytes([i + 1]) * (256 * 1024))
    report = _run_child(CHILD, vm_root, tmp_path, timeout=540)
    assert not report["full_incremental"] and report["delta_incremental"]
    assert report["delta_bytes"] <= 2 * MiB  # only the changed block(s) moved
    # measured in the child itself (VmHWM), whatever ran before in pytest
    assert report["delta_rss_mib"] < 300, report
    qemu.compare(live, tmp_path / "delta.qcow2", "raw", "qcow2")


FRAGMENTED_CHILD = PEAK_RSS + textwrap.dedent(
    """
    import json, sys
    from hypersdk.extents import MAX_EXTENTS
    from hypersdk.formats import get_driver
    from providers import open_source


    root, stride = sys.argv[1], int(sys.argv[2])
    src = open_source(root)
    disk = src.get_vm("frag").disks[0]
    with src.snapshot("frag") as snap:
        changes = src.changed_extents(snap, disk, None)
        tracker = src.change_tracker(snap, disk, changes)
        layout = get_driver("qcow2").plan(disk.capacity, changes.extents, {})
    extents = list(changes.extents)
    missed, i = 0, 0
    for off in range(0, disk.capacity, stride):  # every written byte lies in a data extent
        while extents[i].end <= off:
            i += 1
        missed += not (extents[i].offset <= off and not extents[i].zero)
    print(json.dumps({"rss": peak_rss_mib(), "extents": len(extents), "limit": MAX_EXTENTS,
                      "missed": missed, "data": changes.extents.data_bytes,
                      "tracker": tracker is not None}))
    """
)


@pytest.mark.timeout(300)
def test_fragmented_disk_is_planned_in_bounded_memory(tmp_path):
    """512 Ki separate data runs (a byte every 128 KiB of a 64 GiB disk), twice MAX_EXTENTS: the
    scan and the qcow2 plan stay bounded (313 MiB before maps were bridged), and no data is lost."""
    from providers.sources.local import create_vm

    size, stride = 64 * 1024**3, 128 * 1024
    vm_root = tmp_path / "vms"
    create_vm(vm_root, "frag", {"disk0": size})
    fd = os.open(vm_root / "frag" / "disk0.img", os.O_WRONLY)
    try:
        for off in range(0, size, stride):
            os.pwrite(fd, b"\x01", off)
    finally:
        os.close(fd)
    report = _run_child(FRAGMENTED_CHILD, vm_root, stride, timeout=280)
    assert report["missed"] == 0 and report["tracker"]
    assert report["extents"] <= report["limit"] < size // stride
    assert size // stride * 65536 <= report["data"] < size  # bridged, yet not the whole disk
    assert report["rss"] < 200, report
