"""The embedded demo: a small VM for the local provider, so the main job runs with no cloud
account and no server. The first call creates it; each later call changes a few blocks, as a
guest would between two backups, so the next export is incremental."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypersdk import config
from hypersdk.imagegen import mutate_disk, write_realistic_disk

DEMO_VM = "demo-vm"
DEMO_DISK_SIZE = 384 * 1024 * 1024
DEMO_CHANGED_BLOCKS = 48


@dataclass
class DemoState:
    vm_dir: Path
    created: bool
    changed_blocks: int


def ensure_demo_vm(root: Path | None = None) -> DemoState:
    from providers.sources.local import DESCRIPTION, create_vm, load_vm

    root = root or config.home() / "vms"
    vm_dir = root / DEMO_VM
    if not (vm_dir / DESCRIPTION).is_file():
        vm_dir = create_vm(root, DEMO_VM, {"disk0": DEMO_DISK_SIZE})
        write_realistic_disk(vm_dir / "disk0.img", DEMO_DISK_SIZE, seed=2026)
        return DemoState(vm_dir, True, 0)
    vm = load_vm(vm_dir)
    disk = vm_dir / (vm.disks[0].backing or "disk0.img")
    runs = len(list((vm_dir / ".hypersdk" / "cbt").glob("*/*.bmap")))
    changed = mutate_disk(disk, DEMO_CHANGED_BLOCKS, seed=runs + 1)
    return DemoState(vm_dir, False, len(changed))
