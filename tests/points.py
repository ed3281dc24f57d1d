"""Check a backup point the way a user gets it back: restore it (the whole chain, verified)
into a raw image and compare it with what the disk held at that point (qemu-img compare)."""

from __future__ import annotations

from pathlib import Path

from tests import qemu


def assert_point_equals(
    target_url: str,
    vm: str,
    export_id: str,
    disk_file,
    tmp_path: Path,
    encryption=None,
    disk: str | None = None,
) -> Path:
    from hypersdk.repository.restore import restore_disk
    from providers import open_target

    out = tmp_path / f"restored-{export_id}.raw"
    with open_target(target_url) as target:
        if disk is None:
            from hypersdk.repository.chain import point_manifest

            disk = point_manifest(target, vm, export_id).disks[0].name
        restore_disk(target, vm, export_id, disk, out, "raw", encryption, cache="unsafe")
    qemu.compare(disk_file, out, "raw", "raw")
    return out
