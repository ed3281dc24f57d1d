"""Snapshots: quiesced when VMware Tools run, crash-consistent otherwise; removal is idempotent."""

from __future__ import annotations

import logging
import time
import uuid

from hypersdk.errors import SnapshotError
from hypersdk.models import Snapshot, SnapshotDisk, VMInfo
from providers.vsphere.connection import fault_message, wait_task
from providers.vsphere.inventory import disks_of

log = logging.getLogger(__name__)
PREFIX = "hypersdk-"
# A snapshot of ours this old belongs to a run that died (SIGKILL, a lost worker) before it could
# remove it: no export or CBT stun cycle lasts a day. The next snapshot of the VM removes it, so a
# dead run's delta disks do not grow on the datastore for ever.
STALE_SECONDS = 24 * 3600.0


def _find_by_name(tree, name: str):
    for node in tree or []:
        if node.name == name:
            return node.snapshot
        found = _find_by_name(node.childSnapshotList, name)
        if found is not None:
            return found
    return None


def create(session, vm_ref, info: VMInfo, purpose: str = "export") -> Snapshot:
    """Take a snapshot; its disks (with their CBT change ids) come from the snapshot's config."""
    from pyVmomi import vim, vmodl

    _remove_stale(vm_ref, info.name)
    snap_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    name = PREFIX + snap_id
    tools = info.annotations.get("tools") == "guestToolsRunning"
    quiesce = tools and info.power_state == "poweredOn"
    desc = f"hypersdk {purpose}: removed when the export ends"
    try:
        try:
            ref = wait_task(vm_ref.CreateSnapshot_Task(name, desc, False, quiesce), name)
            consistency = "quiesced" if quiesce else "crash-consistent"
        except vmodl.MethodFault as exc:
            if not quiesce or isinstance(exc, vim.fault.NotAuthenticated):
                raise
            log.warning(
                "quiesced snapshot of %s failed (%s): crash-consistent instead",
                info.name,
                fault_message(exc),
            )
            _remove_named(vm_ref, name)
            ref = wait_task(vm_ref.CreateSnapshot_Task(name, desc, False, False), name)
            consistency = "crash-consistent"
    except vim.fault.NotAuthenticated:
        raise  # the session expired: the source logs in again and retries
    except vmodl.MethodFault as exc:
        _remove_named(vm_ref, name)  # a task that failed late may still have left it behind
        raise SnapshotError(f"cannot snapshot VM {info.name!r}: {fault_message(exc)}") from None
    try:
        disks = disks_of(ref.config.hardware.device)
    except Exception:
        remove_ref(ref)
        raise
    if info.power_state == "poweredOff":
        consistency = "stopped"
    return Snapshot(
        id=snap_id,
        vm=info.model_copy(update={"disks": disks}),
        disks=[SnapshotDisk(disk=d, change_id=d.change_id) for d in disks],
        consistency=consistency,
        provider_data={
            "host": session.creds.host,
            "vm": vm_ref._moId,
            "snapshot": ref._moId,
            "name": name,
            "datacenter": info.annotations.get("datacenter"),
        },
    )


def remove_ref(ref) -> bool:
    """Remove one snapshot (children kept, disks consolidated); False if it was already gone."""
    from pyVmomi import vim, vmodl

    try:
        wait_task(ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True), "remove")
    except (vmodl.fault.ManagedObjectNotFound, vim.fault.NotFound):
        return False
    return True


def _walk(tree):
    for node in tree or []:
        yield node
        yield from _walk(node.childSnapshotList)


def _remove_stale(vm_ref, vm_name: str) -> None:
    """Remove the snapshots of ours older than STALE_SECONDS (best effort: never fails a run)."""
    try:
        snap = vm_ref.snapshot
        now = time.time()
        for node in list(_walk(snap.rootSnapshotList if snap else [])):
            if node.name.startswith(PREFIX) and now - node.createTime.timestamp() > STALE_SECONDS:
                log.warning(
                    "removing snapshot %s of VM %s, left by a run that died", node.name, vm_name
                )
                remove_ref(node.snapshot)
    except Exception as exc:  # noqa: BLE001 - the export goes on; the next run tries again
        log.warning("could not remove stale snapshots of VM %s: %s", vm_name, exc)


def _remove_named(vm_ref, name: str) -> None:
    try:
        snap = vm_ref.snapshot
        ref = _find_by_name(snap.rootSnapshotList if snap else [], name)
        if ref is not None:
            remove_ref(ref)
    except Exception as exc:  # noqa: BLE001 - best-effort cleanup, the caller raises the cause
        log.warning("could not clean up snapshot %s: %s", name, exc)


def remove(session, snap: Snapshot) -> None:
    """Drop the snapshot: safe to call twice, after partial failure, and from a new process."""
    from pyVmomi import vim, vmodl

    data = snap.provider_data
    stub = session.si._stub
    try:
        if data.get("snapshot"):
            remove_ref(vim.vm.Snapshot(data["snapshot"], stub))
        elif data.get("vm") and data.get("name"):
            _remove_named(vim.VirtualMachine(data["vm"], stub), data["name"])
    except vim.fault.NotAuthenticated:
        raise  # the session expired during a long export: the source logs in again and retries
    except vmodl.MethodFault as exc:
        raise SnapshotError(
            f"cannot remove snapshot {data.get('name')} of VM {snap.vm.name!r}: "
            f"{fault_message(exc)} (remove it in vSphere to free datastore space)"
        ) from None
