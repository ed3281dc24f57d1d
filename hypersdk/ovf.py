"""OVF 1.x descriptors (DMTF DSP0243, as VMware writes and reads them) and .mf manifests.

``build_ovf`` turns a VMInfo and its disk files into an Envelope: References (one File per
disk), DiskSection (capacity in bytes, streamOptimized VMDK format URL), NetworkSection,
one VirtualSystem with OperatingSystemSection and VirtualHardwareSection (CPU = ResourceType 3,
memory 4, IDE controller 5, SCSI controller 6, SATA controller 20, disk 17 with Parent and
HostResource ``ovf:/disk/<id>``, NIC 10 with Connection and ResourceSubType) and the firmware as
``vmw:Config key="firmware"``. RASD children are emitted in alphabetical order, as the CIM
schema's xs:sequence requires.

``parse_ovf`` reads one back into a VMInfo plus the disk file references. The descriptor comes
from untrusted archives, so it is parsed with DTDs, entities and external references forbidden
whatever its encoding (defusedxml), and its size, depth and element count are bounded. Names
it carries (the VM's, disks', files') are kept as they are; whoever shows one escapes its
control characters (``hypersdk.references.printable``).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypersdk.errors import FormatError
from hypersdk.references import printable

if TYPE_CHECKING:  # pydantic models load on use: opening an image must not pay for them
    from hypersdk.models import DiskInfo, VMInfo

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
CIM_NS = "http://schemas.dmtf.org/wbem/wscim/1/common"
VMDK_STREAM_URL = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
MAX_OVF_BYTES = 16 * 1024 * 1024
MAX_OVF_DEPTH = 64  # an OVF nests about 6 levels (a VirtualSystemCollection a few more)
MAX_OVF_ELEMENTS = 200_000  # thousands for the largest VM

RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC, RT_DISK, RT_OTHER_STORAGE = 3, 4, 5, 6, 10, 17, 20

_NIC_SUBTYPES = {
    "vmxnet3": "VmxNet3",
    "vmxnet2": "VmxNet2",
    "e1000": "E1000",
    "e1000e": "E1000e",
    "pcnet32": "PCNet32",
    "virtio": "virtio",
}

for _p, _u in (
    ("ovf", OVF_NS),
    ("rasd", RASD_NS),
    ("vssd", VSSD_NS),
    ("vmw", VMW_NS),
    ("xsi", XSI_NS),
    ("cim", CIM_NS),
):
    ET.register_namespace(_p, _u)


def _o(tag: str) -> str:
    return f"{{{OVF_NS}}}{tag}"


def _r(tag: str) -> str:
    return f"{{{RASD_NS}}}{tag}"


@dataclass
class DiskFile:
    """One disk of the VM as the package stores it."""

    disk: DiskInfo
    href: str  # file name inside the package
    file_id: str
    disk_id: str
    size: int | None = None  # bytes of the stored file, when known
    format: str = VMDK_STREAM_URL
    populated: int | None = None


# ---------------------------------------------------------------------------------- build
def _controller_kind(name: str | None) -> str:
    n = (name or "scsi").lower()
    if n.startswith("ide"):
        return "ide"
    if n.startswith(("sata", "ahci")):
        return "sata"
    return "scsi"


def _item(parent: ET.Element, fields: dict[str, str]) -> ET.Element:
    item = ET.SubElement(parent, _o("Item"))
    for key in sorted(fields):  # RASD's schema sequence is alphabetical
        ET.SubElement(item, _r(key)).text = fields[key]
    return item


def build_ovf(vm: VMInfo, files: list[DiskFile], hw_family: str = "vmx-10") -> bytes:
    """The OVF descriptor (UTF-8 XML) for ``vm`` whose disks are stored as ``files``."""
    env = ET.Element(_o("Envelope"), {f"{{{VMW_NS}}}buildId": "hypersdk"})
    refs = ET.SubElement(env, _o("References"))
    for f in files:
        attrs = {_o("href"): f.href, _o("id"): f.file_id}
        if f.size is not None:
            attrs[_o("size")] = str(f.size)
        ET.SubElement(refs, _o("File"), attrs)
    ds = ET.SubElement(env, _o("DiskSection"))
    ET.SubElement(ds, _o("Info")).text = "Virtual disk information"
    for f in files:
        attrs = {
            _o("capacity"): str(-(-f.disk.capacity // 512) * 512),  # VMDKs hold whole sectors
            _o("capacityAllocationUnits"): "byte",
            _o("diskId"): f.disk_id,
            _o("fileRef"): f.file_id,
            _o("format"): f.format,
        }
        if f.populated is not None:
            attrs[_o("populatedSize")] = str(f.populated)
        ET.SubElement(ds, _o("Disk"), attrs)
    networks = list(dict.fromkeys(n.network for n in vm.nics if n.network))
    if networks:
        ns = ET.SubElement(env, _o("NetworkSection"))
        ET.SubElement(ns, _o("Info")).text = "The list of logical networks"
        for name in networks:
            net = ET.SubElement(ns, _o("Network"), {_o("name"): name})
            ET.SubElement(net, _o("Description")).text = f"The {name} network"
    vs = ET.SubElement(env, _o("VirtualSystem"), {_o("id"): vm.id})
    ET.SubElement(vs, _o("Info")).text = "A virtual machine"
    ET.SubElement(vs, _o("Name")).text = vm.name
    if vm.annotations:
        ann = ET.SubElement(vs, _o("AnnotationSection"))
        ET.SubElement(ann, _o("Info")).text = "A human-readable annotation"
        ET.SubElement(ann, _o("Annotation")).text = "\n".join(
            f"{k}={v}" for k, v in sorted(vm.annotations.items())
        )
    os_attrs = {_o("id"): "1"}
    if vm.guest_os:
        os_attrs[f"{{{VMW_NS}}}osType"] = vm.guest_os
    oss = ET.SubElement(vs, _o("OperatingSystemSection"), os_attrs)
    ET.SubElement(oss, _o("Info")).text = "The kind of installed guest operating system"
    hw = ET.SubElement(vs, _o("VirtualHardwareSection"))
    ET.SubElement(hw, _o("Info")).text = "Virtual hardware requirements"
    system = ET.SubElement(hw, _o("System"))
    for key, value in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", vm.name),
        ("VirtualSystemType", hw_family),
    ):
        ET.SubElement(system, f"{{{VSSD_NS}}}{key}").text = value
    iid = 1
    _item(
        hw,
        {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of Virtual CPUs",
            "ElementName": f"{vm.cpus} virtual CPU(s)",
            "InstanceID": str(iid),
            "ResourceType": str(RT_CPU),
            "VirtualQuantity": str(vm.cpus),
        },
    )
    iid += 1
    _item(
        hw,
        {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory Size",
            "ElementName": f"{vm.memory_mib}MB of memory",
            "InstanceID": str(iid),
            "ResourceType": str(RT_MEMORY),
            "VirtualQuantity": str(vm.memory_mib),
        },
    )
    # controllers, in first-use order; disks attach to them by InstanceID
    controllers: dict[str, tuple[int, str]] = {}
    counts: dict[str, int] = {}
    for f in files:
        cname = f.disk.controller or "scsi0"
        if cname in controllers:
            continue
        iid += 1
        kind = _controller_kind(cname)
        number = counts.get(kind, 0)
        counts[kind] = number + 1
        fields = {"Address": str(number), "InstanceID": str(iid), "ElementName": cname}
        if kind == "ide":
            fields |= {"Description": "IDE Controller", "ResourceType": str(RT_IDE)}
        elif kind == "sata":
            fields |= {
                "Description": "SATA Controller",
                "ResourceSubType": "vmware.sata.ahci",
                "ResourceType": str(RT_OTHER_STORAGE),
            }
        else:
            fields |= {
                "Description": "SCSI Controller",
                "ResourceSubType": "lsilogic",
                "ResourceType": str(RT_SCSI),
            }
        _item(hw, fields)
        controllers[cname] = (iid, kind)
    slots: dict[str, int] = {}
    for f in files:
        cname = f.disk.controller or "scsi0"
        parent, _kind = controllers[cname]
        slot = slots.get(cname, 0)
        slots[cname] = slot + 1
        iid += 1
        _item(
            hw,
            {
                "AddressOnParent": str(slot),
                "ElementName": f.disk.name,
                "HostResource": f"ovf:/disk/{f.disk_id}",
                "InstanceID": str(iid),
                "Parent": str(parent),
                "ResourceType": str(RT_DISK),
            },
        )
    for n, nic in enumerate(vm.nics):
        iid += 1
        fields = {
            "AddressOnParent": str(7 + n),
            "AutomaticAllocation": "true",
            "ElementName": nic.name,
            "InstanceID": str(iid),
            "ResourceType": str(RT_NIC),
        }
        if nic.network:
            fields["Connection"] = nic.network
        if nic.adapter:
            fields["ResourceSubType"] = _NIC_SUBTYPES.get(nic.adapter.lower(), nic.adapter)
        if nic.mac:
            fields["Address"] = nic.mac
        _item(hw, fields)
    ET.SubElement(
        hw,
        f"{{{VMW_NS}}}Config",
        {
            _o("required"): "false",
            f"{{{VMW_NS}}}key": "firmware",
            f"{{{VMW_NS}}}value": vm.firmware,
        },
    )
    ET.indent(env, "  ")
    body = ET.tostring(env, encoding="unicode")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode() + b"\n"


# ---------------------------------------------------------------------------------- parse
_UNIT_RE = re.compile(r"^\s*byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_UNIT_WORDS = {"kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30, "terabytes": 2**40}


def _units(text: str | None, default: int, name: str) -> int:
    """Multiplier for an OVF allocation-units string ("byte * 2^30", "MegaBytes"...)."""
    if not text:
        return default
    m = _UNIT_RE.match(text)
    if m:
        if m.group(1) is None:
            return 1
        base, exp = int(m.group(1)), int(m.group(2))
        if base > 1024 or exp > 64:
            raise FormatError(name, f"allocation units {text!r} are implausible")
        return base**exp
    mult = _UNIT_WORDS.get(text.strip().lower())
    if mult is None:
        raise FormatError(name, f"allocation units {text!r} are not understood")
    return mult


def _int(text: str | None, what: str, name: str) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        raise FormatError(name, f"{what} {text!r} is not an integer") from None


class _TooBig(Exception):
    """Raised by the tree builder to stop a parse (too deep, too many elements)."""


class _BoundedBuilder(ET.TreeBuilder):
    """A tree builder that refuses trees deeper or larger than any OVF: memory stays a small
    multiple of the descriptor, and nothing walking the tree can recurse too deep."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.count = 0

    def start(self, tag, attrs):  # type: ignore[override]
        self.depth += 1
        self.count += 1
        if self.depth > MAX_OVF_DEPTH:
            raise _TooBig(f"nests elements deeper than {MAX_OVF_DEPTH} levels")
        if self.count > MAX_OVF_ELEMENTS:
            raise _TooBig(f"holds more than {MAX_OVF_ELEMENTS} elements")
        return super().start(tag, attrs)

    def end(self, tag):  # type: ignore[override]
        self.depth -= 1
        return super().end(tag)


def _safe_xml(data: bytes, name: str) -> ET.Element:
    """Parse an untrusted descriptor: no DTD, entity or external reference in any encoding
    (defusedxml refuses them as the parser meets them, so a UTF-16 DOCTYPE is caught too; a
    byte search for "<!DOCTYPE" is not), bounded size, depth and element count."""
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import DefusedXMLParser

    if len(data) > MAX_OVF_BYTES:
        raise FormatError(name, f"OVF descriptor of {len(data)} bytes is too big")
    parser = DefusedXMLParser(
        target=_BoundedBuilder(), forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    try:
        parser.feed(data)
        return parser.close()
    except DefusedXmlException:
        raise FormatError(
            name, "OVF descriptor declares a DOCTYPE, entities or external references: refused"
        ) from None
    except _TooBig as exc:
        raise FormatError(name, f"OVF descriptor {exc}: refused") from None
    except (ET.ParseError, ValueError, LookupError) as exc:  # LookupError: unknown encoding
        raise FormatError(
            name, f"OVF descriptor is not well-formed XML: {printable(str(exc))}"
        ) from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, local: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == local), None)


def _children(el: ET.Element, local: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == local]


def _attr(el: ET.Element, local: str) -> str | None:
    for k, v in el.attrib.items():
        if _local(k) == local:
            return v
    return None


def parse_ovf(data: bytes, name: str = "descriptor.ovf") -> tuple[VMInfo, list[DiskFile]]:
    """The VM and its disk files described by an OVF descriptor."""
    from pydantic import ValidationError

    try:
        return _parse_ovf(data, name)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FormatError(name, f"OVF describes an invalid VM ({where}: {first['msg']})") from None


def _parse_ovf(data: bytes, name: str) -> tuple[VMInfo, list[DiskFile]]:
    from hypersdk.models import DiskInfo, NicInfo, VMInfo

    root = _safe_xml(data, name)
    if _local(root.tag) != "Envelope":
        raise FormatError(name, f"root element is {_local(root.tag)!r}, not an OVF Envelope")
    files: dict[str, tuple[str, int | None]] = {}
    refs = _child(root, "References")
    for f in _children(refs, "File") if refs is not None else []:
        fid, href = _attr(f, "id"), _attr(f, "href")
        if not fid or not href:
            raise FormatError(name, "a References/File lacks ovf:id or ovf:href")
        size = _attr(f, "size")
        files[fid] = (href, _int(size, "file size", name) if size else None)
    disks: dict[str, dict] = {}
    ds = _child(root, "DiskSection")
    for d in _children(ds, "Disk") if ds is not None else []:
        did = _attr(d, "diskId")
        if not did:
            raise FormatError(name, "a DiskSection/Disk lacks ovf:diskId")
        cap = _int(_attr(d, "capacity"), "disk capacity", name)
        mult = _units(_attr(d, "capacityAllocationUnits"), 1, name)
        ref = _attr(d, "fileRef")
        if ref is not None and ref not in files:
            raise FormatError(name, f"disk {did!r} refers to unknown file {ref!r}")
        populated = _attr(d, "populatedSize")
        disks[did] = {
            "capacity": cap * mult,
            "ref": ref,
            "format": _attr(d, "format") or "",
            "populated": _int(populated, "populated size", name) if populated else None,
        }
    vs = _child(root, "VirtualSystem")
    if vs is None:
        vsc = _child(root, "VirtualSystemCollection")
        vs = _child(vsc, "VirtualSystem") if vsc is not None else None
    if vs is None:
        raise FormatError(name, "OVF descriptor has no VirtualSystem")
    vm_id = _attr(vs, "id") or "vm"
    name_el = _child(vs, "Name")
    vm_name = (name_el.text or "").strip() if name_el is not None else ""
    guest_os = None
    oss = _child(vs, "OperatingSystemSection")
    if oss is not None:
        guest_os = _attr(oss, "osType")
    annotations: dict[str, str] = {}
    ann = _child(vs, "AnnotationSection")
    if ann is not None and _child(ann, "Annotation") is not None:
        for line in (_child(ann, "Annotation").text or "").splitlines():  # type: ignore[union-attr]
            k, sep, v = line.partition("=")
            if sep and k.strip():
                annotations[k.strip()] = v.strip()
    hw = _child(vs, "VirtualHardwareSection")
    if hw is None:
        raise FormatError(name, "VirtualSystem has no VirtualHardwareSection")
    cpus, memory, firmware = 1, 1024, "bios"
    items: list[dict[str, str]] = []
    for item in list(hw):
        local = _local(item.tag)
        if local in ("Item", "StorageItem", "EthernetPortItem"):
            items.append({_local(c.tag): (c.text or "").strip() for c in item})
        elif local == "Config" and _attr(item, "key") == "firmware":
            firmware = "efi" if (_attr(item, "value") or "").lower() == "efi" else "bios"
    controllers: dict[str, str] = {}
    for it in items:
        rt = it.get("ResourceType")
        if rt == str(RT_CPU):
            cpus = _int(it.get("VirtualQuantity"), "CPU count", name)
        elif rt == str(RT_MEMORY):
            qty = _int(it.get("VirtualQuantity"), "memory size", name)
            mult = _units(it.get("AllocationUnits"), 2**20, name)
            memory = max(1, qty * mult // 2**20)
        elif rt in (str(RT_IDE), str(RT_SCSI), str(RT_OTHER_STORAGE)):
            kind = {str(RT_IDE): "ide", str(RT_SCSI): "scsi"}.get(rt, "sata")
            controllers[it.get("InstanceID", "")] = it.get("ElementName") or (
                f"{kind}{it.get('Address', '0')}"
            )
    out_disks: list[DiskInfo] = []
    out_files: list[DiskFile] = []
    nics: list[NicInfo] = []
    for it in items:
        rt = it.get("ResourceType")
        if rt == str(RT_DISK):
            host = it.get("HostResource", "")
            did = host.rsplit("/", 1)[-1]
            if did not in disks:
                raise FormatError(name, f"disk item refers to unknown disk {host!r}")
            d = disks[did]
            href, fsize = files.get(d["ref"], (None, None)) if d["ref"] else (None, None)
            info = DiskInfo(
                name=it.get("ElementName") or did,
                capacity=d["capacity"],
                key=did,
                backing=href,
                format="vmdk" if "vmdk" in d["format"].lower() else None,
                controller=controllers.get(it.get("Parent", "")),
            )
            out_disks.append(info)
            if href:
                out_files.append(
                    DiskFile(info, href, d["ref"], did, fsize, d["format"], d["populated"])
                )
        elif rt == str(RT_NIC):
            sub = it.get("ResourceSubType")
            nics.append(
                NicInfo(
                    name=it.get("ElementName") or f"nic{len(nics)}",
                    network=it.get("Connection") or None,
                    mac=it.get("Address") or None,
                    adapter=sub.lower() if sub else None,
                )
            )
    vm = VMInfo(
        name=vm_name or vm_id,
        id=vm_id,
        cpus=max(1, cpus),
        memory_mib=memory,
        firmware=firmware,  # type: ignore[arg-type]
        guest_os=guest_os,
        power_state="poweredOff",
        disks=out_disks,
        nics=nics,
        annotations=annotations,
    )
    return vm, out_files


# ------------------------------------------------------------------------------- manifest
def manifest_line(filename: str, sha256_hex: str) -> str:
    return f"SHA256({filename})= {sha256_hex}\n"


def build_manifest(digests: dict[str, str]) -> bytes:
    """A .mf manifest: one ``SHA256(file)= hex`` line per file, in the given order."""
    return "".join(manifest_line(n, h) for n, h in digests.items()).encode()


_MF_RE = re.compile(r"^(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")


def parse_manifest(data: bytes, name: str = "manifest.mf") -> dict[str, tuple[str, str]]:
    """{file: (algorithm, hex digest)} from a .mf manifest."""
    out: dict[str, tuple[str, str]] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(name, "manifest is not UTF-8 text") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _MF_RE.match(line.strip())
        if not m:
            raise FormatError(name, f"manifest line not understood: {line[:80]!r}")
        out[m.group(2)] = (m.group(1).lower(), m.group(3).lower())
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
