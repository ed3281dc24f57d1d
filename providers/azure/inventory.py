"""Azure VMs as VMInfo: size (cores, memory), OS and data disks, firmware, NICs, power state.

A VM's disks are named by their place, stable across disk swaps of the same slot: ``os`` for the
OS disk and ``lun<N>`` for data disks; ``key`` is the managed disk's resource id (a swapped disk
is noticed by comparing it, see snapshots.py). Capacities are the disks' exact
``diskSizeBytes``. Firmware is UEFI for Trusted Launch / confidential VMs and for Hyper-V
generation 2 disks, BIOS otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypersdk.errors import SourceError
from hypersdk.models import DiskInfo, NicInfo, VMInfo

_DISK_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Compute/disks/(?P<name>[^/]+)$",
    re.I,
)
_POWER = {
    "running": "poweredOn",
    "starting": "poweredOn",
    "stopping": "poweredOn",
    "stopped": "poweredOff",
    "deallocated": "poweredOff",
    "deallocating": "poweredOff",
}


@dataclass(frozen=True)
class DiskRef:
    """One managed disk of a VM: its slot name, resource group and resource name."""

    slot: str
    id: str
    resource_group: str
    name: str


def _text(value) -> str:
    """An SDK enum's value, or the string itself."""
    return str(getattr(value, "value", value))


def _get(obj, *path, default=None):
    """Walk the SDK's mapping-style models (or dicts) safely: missing parts are ``default``."""
    for step in path:
        if obj is None:
            return default
        obj = obj.get(step) if isinstance(obj, dict) else getattr(obj, step, None)
    return default if obj is None else obj


def disk_refs(vm) -> list[DiskRef]:
    """The VM's managed disks, OS disk first, then data disks by LUN."""
    props = _get(vm, "properties")
    refs = []
    os_id = _get(props, "storage_profile", "os_disk", "managed_disk", "id")
    entries = [("os", os_id)] if os_id else []
    data = sorted(_get(props, "storage_profile", "data_disks", default=[]), key=lambda d: d.lun)
    entries += [(f"lun{d.lun}", _get(d, "managed_disk", "id")) for d in data]
    for slot, disk_id in entries:
        m = _DISK_ID.match(disk_id or "")
        if not m:
            raise SourceError(
                f"VM {vm.name!r}: disk {slot} is not a managed disk (unmanaged VHDs are not "
                "supported)"
            )
        refs.append(DiskRef(slot, disk_id, m["rg"], m["name"]))
    return refs


def power_state(vm) -> str:
    for status in _get(vm, "properties", "instance_view", "statuses", default=[]):
        code = _get(status, "code", default="")
        if code.startswith("PowerState/"):
            return _POWER.get(code.split("/", 1)[1], "unknown")
    return "unknown"


def vm_info(vm, disks: dict[str, object], sizes: dict[str, tuple[int, int]]) -> VMInfo:
    """VMInfo of an SDK VirtualMachine; ``disks`` maps disk resource ids (lower case) to the
    SDK Disk, ``sizes`` VM size names to (cores, memory MiB)."""
    props = _get(vm, "properties")
    vm_size = _get(props, "hardware_profile", "vm_size", default="")
    cores, memory = sizes.get(vm_size, (1, 1024))
    security = _get(props, "security_profile", "security_type", default="")
    infos, gen2 = [], False
    for ref in disk_refs(vm):
        disk = disks.get(ref.id.lower())
        dprops = _get(disk, "properties")
        capacity = _get(dprops, "disk_size_bytes") or (_get(dprops, "disk_size_gb") or 0) * 2**30
        if ref.slot == "os" and _text(_get(dprops, "hyper_v_generation", default="")) == "V2":
            gen2 = True
        infos.append(
            DiskInfo(
                name=ref.slot,
                capacity=int(capacity),
                key=ref.id,
                backing=ref.name,
                format="raw",
                controller="scsi0",
            )
        )
    nics = []
    for i, nic in enumerate(_get(props, "network_profile", "network_interfaces", default=[])):
        nic_id = _get(nic, "id", default="")
        nics.append(NicInfo(name=f"nic{i}", network=nic_id.rsplit("/", 1)[-1] or None))
    annotations = {"vm_size": vm_size, "location": _get(vm, "location", default="")}
    if security:
        annotations["security_type"] = _text(security)
    os_type = _get(props, "storage_profile", "os_disk", "os_type")
    return VMInfo(
        name=vm.name,
        id=_get(props, "vm_id", default=vm.name),
        cpus=max(1, int(cores)),
        memory_mib=max(1, int(memory)),
        firmware="efi" if security or gen2 else "bios",
        guest_os=_text(os_type) if os_type else None,
        power_state=power_state(vm),
        machine_type=vm_size or None,
        disks=infos,
        nics=nics,
        annotations={k: v for k, v in annotations.items() if v},
    )
