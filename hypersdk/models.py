"""Pydantic models shared by sources, targets, tasks and flows (serialisable, Prefect-friendly)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_DISK_BYTES = 1 << 50
"""1 PiB: beyond every hypervisor's and cloud's largest disk (64 TiB) and every format's. A size
above it from a source (an API, a vm.json) is refused, never planned (maps, tables, allocations
sized by it)."""


class DiskInfo(BaseModel):
    """One virtual disk of a VM as the source describes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Stable name within the VM, e.g. 'disk0' or 'scsi0:0'")
    capacity: int = Field(ge=0, le=MAX_DISK_BYTES, description="Virtual size in bytes")
    key: str | None = Field(
        default=None, description="Source-specific id (vSphere device key, volume id)"
    )
    backing: str | None = Field(default=None, description="Where the disk lives on the source")
    format: str | None = Field(default=None, description="Container format on the source, if known")
    controller: str | None = None
    change_id: str | None = Field(
        default=None, description="Source change id, where the source tracks changes"
    )


class NicInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    network: str | None = None
    mac: str | None = None
    adapter: str | None = None


PowerState = Literal["poweredOn", "poweredOff", "suspended", "unknown"]


class VMInfo(BaseModel):
    """A VM's description: enough to rebuild it elsewhere (OVF) and to find its disks."""

    model_config = ConfigDict(extra="forbid")

    name: str
    id: str
    cpus: int = Field(default=1, ge=1)
    memory_mib: int = Field(default=1024, ge=1)
    firmware: Literal["bios", "efi"] = "bios"
    guest_os: str | None = None
    power_state: PowerState = "unknown"
    machine_type: str | None = Field(
        default=None,
        description="The cloud's size name: EC2 instance type, Azure VM size, GCE machine type",
    )
    cbt_enabled: bool | None = None
    disks: list[DiskInfo] = Field(default_factory=list)
    nics: list[NicInfo] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)


class SnapshotDisk(BaseModel):
    disk: DiskInfo
    change_id: str | None = Field(
        default=None, description="Change id of this disk at snapshot time"
    )


class Snapshot(BaseModel):
    """A point-in-time view of a VM's disks. Sources put their own handles in ``provider_data``."""

    id: str
    vm: VMInfo
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    disks: list[SnapshotDisk]
    consistency: Literal["quiesced", "crash-consistent", "stopped", "clone"] = "crash-consistent"
    provider_data: dict[str, Any] = Field(default_factory=dict)


class ObjectInfo(BaseModel):
    key: str
    size: int
    modified: datetime | None = None
    storage_class: str | None = None
