"""EC2 instances as VMInfo: named by their Name tag (or id), with CPUs and memory from the
instance type, firmware, architecture, every EBS volume by device name, network interfaces."""

from __future__ import annotations

import re

from hypersdk.errors import SourceError, VMNotFoundError
from hypersdk.models import DiskInfo, NicInfo, VMInfo
from hypersdk.references import printable
from providers.aws.client import Settings, aws_errors

GiB = 1024**3
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_POWER = {"running": "poweredOn", "stopped": "poweredOff"}
_LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]  # not terminated


def disk_name(device: str) -> str:
    """``/dev/sda1`` -> ``sda1``, ``xvdf`` -> ``xvdf``: stable per instance, usable in keys."""
    name = device.removeprefix("/dev/").replace("/", "_")
    return name or "disk"


def _name(inst: dict) -> str:
    for tag in inst.get("Tags") or []:
        if tag.get("Key") == "Name" and tag.get("Value"):
            return str(tag["Value"])
    return inst["InstanceId"]


def _firmware(inst: dict) -> str:
    """UEFI when the instance says so (``CurrentInstanceBootMode``/``BootMode``); otherwise
    what EC2 defaults to: UEFI on arm64 (Graviton), legacy BIOS on x86_64."""
    mode = inst.get("CurrentInstanceBootMode") or inst.get("BootMode") or ""
    if mode:
        return "efi" if "uefi" in str(mode) else "bios"
    return "efi" if inst.get("Architecture") == "arm64" else "bios"


class Inventory:
    """Reads of EC2 for one region (one Settings)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self._types: dict[str, dict] = {}

    @property
    def ec2(self):
        return self.s.client("ec2")

    def instances(self, ids: list[str] | None = None, name: str | None = None) -> list[dict]:
        filters = [{"Name": "instance-state-name", "Values": _LIVE}]
        if name is not None:
            filters.append({"Name": "tag:Name", "Values": [name]})
        kwargs: dict = {"Filters": filters}
        if ids:
            kwargs["InstanceIds"] = ids
        found = []
        with aws_errors(f"EC2 DescribeInstances in {self.s.region}"):
            for page in self.ec2.get_paginator("describe_instances").paginate(**kwargs):
                for res in page.get("Reservations", []):
                    found.extend(res.get("Instances", []))
        return found

    def find(self, vm: str) -> dict:
        """The instance ``vm`` names (an instance id, or a Name tag naming exactly one)."""
        if INSTANCE_ID.fullmatch(vm):
            try:
                found = self.instances(ids=[vm])
            except VMNotFoundError:
                found = []
        else:
            found = self.instances(name=vm)
        if not found:
            raise VMNotFoundError(
                f"no EC2 instance {printable(vm)[:80]!r} in {self.s.region} (not terminated)"
            )
        if len(found) > 1:
            ids = ", ".join(sorted(i["InstanceId"] for i in found))
            raise SourceError(
                f"{len(found)} EC2 instances are named {printable(vm)[:80]!r} in {self.s.region} "
                f"({ids}): name one by its instance id"
            )
        return found[0]

    def _type(self, name: str) -> dict:
        if name not in self._types:
            with aws_errors(f"EC2 DescribeInstanceTypes {name}"):
                answer = self.ec2.describe_instance_types(InstanceTypes=[name])
            types = answer.get("InstanceTypes") or [{}]
            self._types[name] = types[0]
        return self._types[name]

    def volumes(self, ids: list[str]) -> dict[str, dict]:
        if not ids:
            return {}
        with aws_errors(f"EC2 DescribeVolumes in {self.s.region}"):
            answer = self.ec2.describe_volumes(VolumeIds=ids)
        return {v["VolumeId"]: v for v in answer.get("Volumes", [])}

    def describe(self, inst: dict) -> VMInfo:
        itype = inst.get("InstanceType", "")
        info = self._type(itype) if itype else {}
        cpu = inst.get("CpuOptions") or {}
        cpus = (cpu.get("CoreCount") or 0) * (cpu.get("ThreadsPerCore") or 1)
        cpus = cpus or info.get("VCpuInfo", {}).get("DefaultVCpus") or 1
        memory = info.get("MemoryInfo", {}).get("SizeInMiB") or 1024
        mappings = [m for m in inst.get("BlockDeviceMappings", []) if m.get("Ebs")]
        vols = self.volumes([m["Ebs"]["VolumeId"] for m in mappings])
        disks = []
        for m in mappings:
            vol_id = m["Ebs"]["VolumeId"]
            vol = vols.get(vol_id, {})
            disks.append(
                DiskInfo(
                    name=disk_name(m["DeviceName"]),
                    capacity=int(vol.get("Size", 0)) * GiB,
                    key=vol_id,
                    backing=vol_id,
                    format="raw",
                    controller=m["DeviceName"],
                )
            )
        nics = [
            NicInfo(
                name=n.get("NetworkInterfaceId", f"eni{i}"),
                network=n.get("SubnetId") or n.get("VpcId"),
                mac=n.get("MacAddress"),
                adapter="ena",
            )
            for i, n in enumerate(inst.get("NetworkInterfaces", []))
        ]
        annotations = {
            "instance_type": itype,
            "architecture": str(inst.get("Architecture", "")),
            "region": self.s.region,
            "availability_zone": str(inst.get("Placement", {}).get("AvailabilityZone", "")),
            "root_device": str(inst.get("RootDeviceName", "")),
            "state": str(inst.get("State", {}).get("Name", "")),
        }
        return VMInfo(
            name=_name(inst),
            id=inst["InstanceId"],
            cpus=int(cpus),
            memory_mib=int(memory),
            firmware=_firmware(inst),
            guest_os=inst.get("PlatformDetails") or inst.get("Platform"),
            power_state=_POWER.get(inst.get("State", {}).get("Name", ""), "unknown"),
            machine_type=itype or None,
            cbt_enabled=True,  # EBS snapshots always know their changed blocks
            disks=disks,
            nics=nics,
            annotations={k: v for k, v in annotations.items() if v},
        )

    def list_vms(self) -> list[VMInfo]:
        return [self.describe(i) for i in self.instances()]
