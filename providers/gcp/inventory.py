"""Compute Engine instances as VMInfo: machine type (vCPUs, memory), disks, firmware, NICs.

Firmware: an instance is UEFI when it is a Shielded VM (``shieldedInstanceConfig`` with secure
boot or vTPM, which need UEFI) or when its boot disk's image declares the ``UEFI_COMPATIBLE``
guest OS feature; otherwise BIOS. GCE reports no MAC addresses (the NICs are virtio-net/gVNIC
devices with addresses assigned at boot), so a NIC carries its network and internal IP.
"""

from __future__ import annotations

from typing import Any

from hypersdk.models import DiskInfo, NicInfo, VMInfo

GiB = 1024**3
_POWER = {
    "RUNNING": "poweredOn",
    "TERMINATED": "poweredOff",
    "STOPPED": "poweredOff",
    "SUSPENDED": "suspended",
}


def last(url: str | None) -> str:
    """The resource name at the end of a Compute URL (``.../zones/z/disks/NAME``)."""
    return (url or "").rstrip("/").rsplit("/", 1)[-1]


def is_uefi(instance: Any, disks: list[Any]) -> bool:
    shielded = getattr(instance, "shielded_instance_config", None)
    if shielded is not None and (
        getattr(shielded, "enable_secure_boot", False) or getattr(shielded, "enable_vtpm", False)
    ):
        return True
    for attached in disks:
        if getattr(attached, "boot", False):
            features = getattr(attached, "guest_os_features", None) or []
            if any(getattr(f, "type_", "") == "UEFI_COMPATIBLE" for f in features):
                return True
    return False


def vm_info(instance: Any, machine: Any | None, disk_sizes: dict[str, int]) -> VMInfo:
    """``instance`` (compute_v1.Instance), its machine type (or None), the size in bytes of
    each attached disk by its source URL."""
    disks = []
    for attached in instance.disks:
        source = attached.source
        name = attached.device_name or last(source)
        disks.append(
            DiskInfo(
                name=name,
                capacity=disk_sizes.get(source, int(attached.disk_size_gb or 0) * GiB),
                key=last(source),
                backing=source,
                format="raw",
                controller=(attached.interface or "SCSI").lower(),
            )
        )
    nics = [
        NicInfo(
            name=n.name or f"nic{i}", network=last(n.network) or None, adapter=n.nic_type or None
        )
        for i, n in enumerate(instance.network_interfaces)
    ]
    annotations = {"machine_type": last(instance.machine_type), "zone": last(instance.zone)}
    for i, n in enumerate(instance.network_interfaces):
        if n.network_i_p:
            annotations[f"nic{i}_ip"] = n.network_i_p
    return VMInfo(
        name=instance.name,
        id=str(instance.id),
        cpus=max(1, int(getattr(machine, "guest_cpus", 0) or 1)),
        memory_mib=max(1, int(getattr(machine, "memory_mb", 0) or 1024)),
        firmware="efi" if is_uefi(instance, list(instance.disks)) else "bios",
        guest_os=None,
        power_state=_POWER.get(instance.status, "unknown"),
        machine_type=last(instance.machine_type) or None,
        cbt_enabled=False,
        disks=disks,
        nics=nics,
        annotations=annotations,
    )
