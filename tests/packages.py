"""Hand-made OVF descriptors and OVA archives for tests of hostile packages."""

from __future__ import annotations

from pathlib import Path

from hypersdk.formats.ova import tar_header
from hypersdk.models import DiskInfo, VMInfo
from hypersdk.ovf import DiskFile, build_ovf

RAW_URL = "http://en.wikipedia.org/wiki/Byte"
QCOW2_URL = "http://www.gnome.org/~markmc/qcow-image-format.html"
VMDK_URL = "http://www.vmware.com/interfaces/specifications/vmdk.html#monolithicFlat"
UNKNOWN_URL = "http://example.com/some-format"


def one_disk_ovf(href: str, capacity: int, fmt: str, vm_name: str = "vm") -> bytes:
    """A descriptor of a one-disk VM whose disk is the file ``href`` in format URL ``fmt``."""
    vm = VMInfo(
        name=vm_name, id="vm", disks=[DiskInfo(name="disk", capacity=capacity, controller="scsi0")]
    )
    return build_ovf(vm, [DiskFile(vm.disks[0], href, "file1", "vmdisk1", None, format=fmt)])


def make_ova(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of ``members`` in order (the descriptor first, as an OVA has it)."""
    with open(path, "wb") as f:
        for name, data in members:
            f.write(tar_header(name, len(data), 0))
            f.write(data)
            f.write(bytes(-len(data) % 512))
        f.write(bytes(1024))
    return path
