"""Check a backup point the way a user gets it back: restore it (the whole chain, verified)
into a raw image and compare it with what the disk held at that point (qemu-img compare)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests import qemu

MiB = 1024 * 1024
SIZE = 20 * MiB + 12345  # odd-sized: the last block is partial


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


def change_disk(disk: Path, step: int) -> None:
    """Guest writes of several kinds: overwrite data, write into a zero area, zero a block,
    touch the partial last block."""
    with open(disk, "r+b") as f:
        f.seek((step * 3 * MiB) % (18 * MiB) + 4096)
        f.write(os.urandom(70_000))  # overwrite (crosses a 64 KiB block)
        f.seek(SIZE - 1000)
        f.write(bytes([step + 1]) * 1000)  # the odd last block
        f.seek((step + 1) * MiB)
        f.write(bytes(64 * 1024))  # a block zeroed
        f.seek(19 * MiB + step * 65536)
        f.write(b"\x5a" * 65536)  # data where there were zeros


def make_vm(tmp_path: Path) -> tuple[Path, Path]:
    """A one-disk VM "db01" (odd-sized disk, with a zero area to write into later): (its
    source root, its disk file)."""
    from hypersdk.imagegen import write_realistic_disk
    from providers.sources.local import create_vm

    root = tmp_path / "vms"
    d = create_vm(root, "db01", {"disk0": SIZE})
    write_realistic_disk(d / "disk0.img", SIZE, seed=77)
    with open(d / "disk0.img", "r+b") as f:  # a zero area to write into later
        f.seek(19 * MiB)
        f.write(bytes(MiB))
    return root, d / "disk0.img"


def run_chain(
    source: str, target: str, disk: Path, copies: Path, encryption=None, points: int = 4, first=0
) -> list:
    """``points`` backups of db01, the disk changed before each but the first (steps numbered
    from ``first``), a copy of the disk kept per point in ``copies/<export id>.raw``."""
    from flows.backup import backup_vm

    results = []
    for step in range(first, first + points):
        if step:
            change_disk(disk, step)
        r = backup_vm(vm="db01", source=source, target=target, encryption=encryption)
        shutil.copyfile(disk, copies / f"{r.export_id}.raw")
        results.append(r)
    if first == 0:
        assert [r.kind for r in results] == ["full"] + ["incremental"] * (points - 1)
    return results
