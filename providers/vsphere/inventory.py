"""Inventory: find VMs and describe them as VMInfo.

Listing uses one container view and the PropertyCollector (RetrievePropertiesEx, paged with
ContinueRetrievePropertiesEx) asking only for the properties VMInfo needs: one round trip per
1000 VMs instead of one per property per VM, which is what makes thousands of VMs fast.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from hypersdk.errors import SourceError, VMNotFoundError
from hypersdk.models import DiskInfo, NicInfo, VMInfo

VM_PROPS = [
    "name",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.firmware",
    "config.guestId",
    "config.instanceUuid",
    "config.changeTrackingEnabled",
    "config.template",
    "runtime.powerState",
    "guest.toolsRunningStatus",
]
_MOREF = re.compile(r"^vm-\d+$")
_POWER = {"poweredOn": "poweredOn", "poweredOff": "poweredOff", "suspended": "suspended"}


def collect(content, root, obj_type, props: list[str], recursive: bool = True) -> Iterator:
    """(object, {property: value}) for every ``obj_type`` under ``root``, few round trips."""
    from pyVmomi import vim, vmodl

    pc_t = vmodl.query.PropertyCollector
    view = content.viewManager.CreateContainerView(root, [obj_type], recursive)
    try:
        spec = pc_t.FilterSpec(
            objectSet=[
                pc_t.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        pc_t.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[pc_t.PropertySpec(type=obj_type, pathSet=props)],
        )
        pc = content.propertyCollector
        res = pc.RetrievePropertiesEx([spec], pc_t.RetrieveOptions(maxObjects=1000))
        while res is not None:
            for oc in res.objects or []:
                yield oc.obj, {p.name: p.val for p in oc.propSet or []}
            if not res.token:
                break
            res = pc.ContinueRetrievePropertiesEx(res.token)
    finally:
        view.Destroy()


def inventory_path(entity) -> str:
    """Inventory path of an entity ("DC0" or "Folder/DC0"), as dcPath in datastore URLs wants."""
    from pyVmomi import vim

    names = []
    while entity is not None and not (
        isinstance(entity, vim.Folder) and entity.parent is None
    ):  # stop below the root folder
        names.append(entity.name)
        entity = entity.parent
    return "/".join(reversed(names))


def datacenter_of(entity):
    from pyVmomi import vim

    while entity is not None and not isinstance(entity, vim.Datacenter):
        entity = entity.parent
    return entity


def _adapter(device) -> str:
    name = type(device).__name__.rsplit(".", 1)[-1]
    return name.removeprefix("Virtual").lower()


def _bus_prefix(ctrl) -> str:
    from pyVmomi import vim

    dev = vim.vm.device
    for cls, prefix in (
        (dev.VirtualSCSIController, "scsi"),
        (dev.VirtualIDEController, "ide"),
        (dev.VirtualSATAController, "sata"),
        (getattr(dev, "VirtualNVMEController", ()), "nvme"),
    ):
        if cls and isinstance(ctrl, cls):
            return prefix
    return "disk"


def disks_of(devices) -> list[DiskInfo]:
    from pyVmomi import vim

    ctrls = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    disks = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        ctrl = ctrls.get(d.controllerKey)
        bus = f"{_bus_prefix(ctrl)}{ctrl.busNumber}" if ctrl is not None else "disk"
        capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
        disks.append(
            DiskInfo(
                name=f"{bus}-{d.unitNumber if d.unitNumber is not None else d.key}",
                capacity=capacity,
                key=str(d.key),
                backing=getattr(d.backing, "fileName", None),
                format="vmdk",
                controller=bus,
                change_id=getattr(d.backing, "changeId", None) or None,
            )
        )
    return disks


def nics_of(devices) -> list[NicInfo]:
    from pyVmomi import vim

    nics = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualEthernetCard):
            continue
        b = d.backing
        network = getattr(b, "deviceName", None)
        port = getattr(b, "port", None)
        if network is None and port is not None:
            network = f"dvportgroup:{port.portgroupKey}"
        nics.append(
            NicInfo(
                name=(d.deviceInfo.label if d.deviceInfo else None) or f"nic{d.key}",
                network=network,
                mac=d.macAddress,
                adapter=_adapter(d),
            )
        )
    return nics


def vm_info(ref, props: dict, datacenter: str | None) -> VMInfo:
    devices = props.get("config.hardware.device") or []
    annotations = {"moref": ref._moId}
    if datacenter:
        annotations["datacenter"] = datacenter
    if props.get("config.instanceUuid"):
        annotations["instance_uuid"] = props["config.instanceUuid"]
    if props.get("guest.toolsRunningStatus"):
        annotations["tools"] = props["guest.toolsRunningStatus"]
    return VMInfo(
        name=props.get("name") or ref._moId,
        id=ref._moId,
        cpus=max(1, props.get("config.hardware.numCPU") or 1),
        memory_mib=max(1, props.get("config.hardware.memoryMB") or 1),
        firmware="efi" if props.get("config.firmware") == "efi" else "bios",
        guest_os=props.get("config.guestId"),
        power_state=_POWER.get(str(props.get("runtime.powerState")), "unknown"),
        cbt_enabled=bool(props.get("config.changeTrackingEnabled")),
        disks=disks_of(devices),
        nics=nics_of(devices),
        annotations=annotations,
    )


class Inventory:
    """VM lookups within a scope: the whole server, a datacenter, a folder, or a single VM."""

    def __init__(self, session, path: str = ""):
        self.session = session
        self.path = path.strip("/")

    def _scope(self):
        """[(datacenter path, container)] to search, or a single VM object."""
        from pyVmomi import vim

        content = self.session.content
        if not self.path:
            root = content.rootFolder
        else:
            root = content.searchIndex.FindByInventoryPath(self.path)
            if root is None:
                raise VMNotFoundError(
                    f"inventory path {self.path!r} not found on {self.session.creds.host} "
                    "(form: Datacenter/vm/folder/VM)"
                )
        if isinstance(root, vim.VirtualMachine):
            return root
        dc = datacenter_of(root)
        if dc is not None:
            container = dc.vmFolder if root is dc else root
            return [(inventory_path(dc), container)]
        dcs = collect(content, root, vim.Datacenter, ["name", "vmFolder"])
        return [(inventory_path(ref), p["vmFolder"]) for ref, p in dcs]

    def _read_one(self, ref, dc: str | None) -> VMInfo:
        from pyVmomi import vim, vmodl

        pc_t = vmodl.query.PropertyCollector
        spec = pc_t.FilterSpec(
            objectSet=[pc_t.ObjectSpec(obj=ref, skip=False)],
            propSet=[pc_t.PropertySpec(type=vim.VirtualMachine, pathSet=VM_PROPS)],
        )
        try:
            res = self.session.content.propertyCollector.RetrievePropertiesEx(
                [spec], pc_t.RetrieveOptions()
            )
        except vmodl.fault.ManagedObjectNotFound:
            raise VMNotFoundError(
                f"VM {ref._moId} not found on {self.session.creds.host}"
            ) from None
        if res is None or not res.objects:
            raise VMNotFoundError(f"VM {ref._moId} not found on {self.session.creds.host}")
        props = {p.name: p.val for p in res.objects[0].propSet or []}
        if dc is None:
            owner = datacenter_of(ref)
            dc = inventory_path(owner) if owner is not None else None
        return vm_info(ref, props, dc)

    def list_vms(self) -> list[VMInfo]:
        from pyVmomi import vim

        scope = self._scope()
        if isinstance(scope, vim.VirtualMachine):
            return [self._read_one(scope, None)]
        out = []
        for dc, container in scope:
            for ref, props in collect(
                self.session.content, container, vim.VirtualMachine, VM_PROPS
            ):
                if props.get("config.template"):
                    continue
                out.append(vm_info(ref, props, dc))
        return sorted(out, key=lambda v: v.name)

    def find(self, name: str | None) -> tuple[object, VMInfo]:
        """(managed object, VMInfo) of a VM by name, moref ("vm-42") or instance UUID."""
        from pyVmomi import vim

        scope = self._scope()
        if isinstance(scope, vim.VirtualMachine):
            if name in (None, scope._moId) or name == scope.name:
                return scope, self._read_one(scope, None)
            raise VMNotFoundError(
                f"VM {name!r} does not match the source URL, which names {self.path!r}"
            )
        if not name:
            raise VMNotFoundError("no VM given: name one (or put its path in the source URL)")
        if _MOREF.match(name):
            ref = vim.VirtualMachine(name, self.session.si._stub)
            return ref, self._read_one(ref, None)
        hits = []
        for dc, container in scope:
            for ref, props in collect(
                self.session.content, container, vim.VirtualMachine, ["name", "config.instanceUuid"]
            ):
                if name in (props.get("name"), props.get("config.instanceUuid")):
                    hits.append((ref, dc))
        if not hits:
            where = f"{self.session.creds.host}/{self.path}".rstrip("/")
            raise VMNotFoundError(f"VM {name!r} not found on {where}")
        if len(hits) > 1:
            ids = ", ".join(r._moId for r, _ in hits)
            raise SourceError(
                f"{len(hits)} VMs are named {name!r} ({ids}): use the moref or an inventory path"
            )
        ref, dc = hits[0]
        return ref, self._read_one(ref, dc)
