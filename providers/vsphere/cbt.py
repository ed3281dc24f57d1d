"""Changed Block Tracking: enable it, and ask QueryChangedDiskAreas what to move.

vSphere answers QueryChangedDiskAreas one window at a time: each answer covers
``[startOffset, startOffset + length)`` and the client must ask again from its end until the disk's
capacity. Change id ``"*"`` asks for the allocated areas (a first full export); a real change id,
taken from the previous snapshot's ``backing.changeId``, for what changed since then. A change id
the server rejects (CBT reset, disk resized, VM moved) gives a full map with a note, never less data.

Real vSphere starts tracking only after a stun/unstun cycle of the VM (power cycle, snapshot
create/remove, vMotion): ``enable`` does a snapshot create/remove so the next export can use CBT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hypersdk.errors import SourceError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.models import DiskInfo
from providers.base import DiskChanges
from providers.vsphere.connection import fault_message, wait_task

log = logging.getLogger(__name__)
MAX_CALLS = 1_000_000  # a server that never advances must not loop forever


@dataclass
class QueryResult:
    extents: list[Extent]
    calls: int


def enable(vm_ref, stun: bool = True) -> bool:
    """Turn CBT on (ReconfigVM); with ``stun``, cycle a snapshot so tracking starts now.

    Returns False when it was already on (nothing reconfigured; the stun cycle still runs)."""
    from pyVmomi import vim, vmodl

    was_on = bool(vm_ref.config.changeTrackingEnabled)
    try:
        if not was_on:
            spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
            wait_task(vm_ref.ReconfigVM_Task(spec), "enable CBT")
        if stun:
            ref = wait_task(
                vm_ref.CreateSnapshot_Task("hypersdk-cbt-activate", "CBT stun cycle", False, False),
                "CBT stun cycle",
            )
            wait_task(ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True), "remove")
    except vim.fault.NotAuthenticated:
        raise  # the source logs in again and retries
    except vmodl.MethodFault as exc:
        raise SourceError(f"cannot enable CBT on VM {vm_ref._moId}: {fault_message(exc)}") from None
    return not was_on


def _merge(extents: list[Extent], capacity: int) -> list[Extent]:
    """Clip to the disk and merge overlaps (windows may share a block at their edges)."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda x: x.offset):
        start, end = max(0, e.offset), min(capacity, e.end)
        if end <= start:
            continue
        if out and start <= out[-1].end:
            last = out[-1]
            out[-1] = Extent(last.offset, max(last.end, end) - last.offset)
        else:
            out.append(Extent(start, end - start))
    return out


def query(vm_ref, snap_ref, device_key: int, capacity: int, change_id: str) -> QueryResult:
    """All changed areas of one disk, following the server's windows to the end of the disk."""
    extents: list[Extent] = []
    start, calls = 0, 0
    while start < capacity:
        info = vm_ref.QueryChangedDiskAreas(
            snapshot=snap_ref, deviceKey=device_key, startOffset=start, changeId=change_id
        )
        calls += 1
        extents.extend(Extent(a.start, a.length) for a in info.changedArea or [])
        end = info.startOffset + info.length
        if end <= start or calls > MAX_CALLS:
            raise SourceError(
                f"QueryChangedDiskAreas made no progress at offset {start} of disk {device_key}"
            )
        start = end
    return QueryResult(_merge(extents, capacity), calls)


def changed_extents(session, snap, disk: DiskInfo, since: str | None) -> DiskChanges:
    """DiskChanges for ``disk`` of ``snap``; see the module docstring for the fallbacks."""
    from pyVmomi import vim, vmodl

    stub = session.si._stub
    vm_ref = vim.VirtualMachine(snap.provider_data["vm"], stub)
    snap_ref = vim.vm.Snapshot(snap.provider_data["snapshot"], stub)
    sd = next((d for d in snap.disks if d.disk.name == disk.name), None)
    if sd is None:
        raise SourceError(f"snapshot {snap.id} has no disk {disk.name!r}")
    capacity, key = sd.disk.capacity, int(sd.disk.key or 0)
    new_id = sd.change_id
    if not new_id:
        note = (
            f"CBT is not active on VM {snap.vm.name!r}: whole disk read "
            "(enable it with `hyperctl cbt enable`)"
        )
        return DiskChanges(ExtentMap.full(capacity), None, None, note=note)
    note = ""
    if since is not None:
        try:
            res = query(vm_ref, snap_ref, key, capacity, since)
            return DiskChanges(ExtentMap(capacity, res.extents), new_id, since)
        except (vmodl.fault.InvalidArgument, vim.fault.FileFault, vmodl.fault.SystemError) as exc:
            note = (
                f"change id {since} was rejected by vSphere ({fault_message(exc)}): "
                "CBT was reset or the disk changed; full export instead"
            )
            log.warning("%s: %s", disk.name, note)
    try:
        res = query(vm_ref, snap_ref, key, capacity, "*")
        return DiskChanges(ExtentMap(capacity, res.extents), new_id, None, note=note)
    except (vmodl.fault.InvalidArgument, vim.fault.FileFault, vmodl.fault.SystemError) as exc:
        extra = f"allocated areas unavailable ({fault_message(exc)}): whole disk read"
        return DiskChanges(
            ExtentMap.full(capacity), new_id, None, note="; ".join(n for n in (note, extra) if n)
        )


def status(vm_ref) -> dict:
    """CBT state of a VM: enabled flag and each disk's current change id."""
    from providers.vsphere.inventory import disks_of

    cfg = vm_ref.config
    return {
        "vm": vm_ref.name,
        "moref": vm_ref._moId,
        "enabled": bool(cfg.changeTrackingEnabled),
        "disks": {d.name: d.change_id for d in disks_of(cfg.hardware.device)},
    }
