"""Memory stays bounded whatever the disk size: a full then an incremental export of a 4 TiB
(sparse) disk through the engine and the local source, measured in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests import qemu

TiB = 1024**4
MiB = 1024**2

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from hypersdk.atomic import atomic_file
    from hypersdk.pipeline import export_stream
    from providers import open_source

    def peak_rss_mib():
        # VmHWM: this process's own peak. ru_maxrss would start from the parent's at fork,
        # and pytest's process is large once Prefect flows have run in it.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

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
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(vm_root), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert not report["full_incremental"] and report["delta_incremental"]
    assert report["delta_bytes"] <= 2 * MiB  # only the changed block(s) moved
    # measured in the child itself (VmHWM), whatever ran before in pytest
    assert report["delta_rss_mib"] < 300, report
    qemu.compare(live, tmp_path / "delta.qcow2", "raw", "qcow2")
