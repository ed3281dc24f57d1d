"""OVF descriptors and OVA packages: written by us, judged by tar, sha256 and qemu-img; read back
through the ova source; hostile packages refused."""

from __future__ import annotations

import hashlib
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from hypersdk.atomic import atomic_file
from hypersdk.convert import convert_file
from hypersdk.errors import FormatError, VMNotFoundError
from hypersdk.formats import open_image
from hypersdk.formats.ova import Package, tar_header, tar_members, write_ova
from hypersdk.io import FileRangeReader
from hypersdk.models import DiskInfo, NicInfo, VMInfo
from hypersdk.ovf import build_ovf, parse_manifest, parse_ovf
from providers import open_source
from tests import qemu
from tests.fixtures.tools import need_tool

MiB = 1024 * 1024


def _disk(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"boot sector " * 400)
        for _ in range(8):
            f.seek(rng.randrange(0, size - 70_000))
            f.write(rng.randbytes(65536) if rng.random() < 0.5 else b"log line\n" * 7000)
    return path


def _vm(sizes: list[int]) -> VMInfo:
    return VMInfo(
        name="web-01",
        id="vm-42",
        cpus=4,
        memory_mib=3072,
        firmware="efi",
        guest_os="debian12_64Guest",
        disks=[
            DiskInfo(name=f"disk{i}", capacity=s, controller="scsi0" if i == 0 else "ide0")
            for i, s in enumerate(sizes)
        ],
        nics=[
            NicInfo(name="nic0", network="VM Network", mac="00:50:56:aa:bb:cc", adapter="vmxnet3"),
            NicInfo(name="nic1", network="backend", adapter="e1000"),
        ],
        annotations={"owner": "ops"},
    )


@pytest.fixture(scope="module")
def ova(tmp_path_factory):
    d = tmp_path_factory.mktemp("ova")
    srcs = [_disk(d / "a.raw", 16 * MiB, 1), _disk(d / "b.raw", 8 * MiB + 4096, 2)]
    vm = _vm([p.stat().st_size for p in srcs])
    path = d / "web-01.ova"
    readers = [FileRangeReader(p) for p in srcs]
    try:
        with atomic_file(path) as sink:
            n = write_ova(
                vm,
                [(disk, r, r.allocated()) for disk, r in zip(vm.disks, readers, strict=True)],
                sink,
            )
    finally:
        for r in readers:
            r.close()
    assert n == path.stat().st_size
    return {"path": path, "vm": vm, "srcs": srcs, "dir": d}


def test_tar_order_manifest_and_disks(ova, tmp_path):
    tar = need_tool("tar")
    listing = subprocess.run(
        [tar, "tf", str(ova["path"])], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == ["web-01.ovf", "web-01.mf", "web-01-disk1.vmdk", "web-01-disk2.vmdk"]
    subprocess.run([tar, "xf", str(ova["path"]), "-C", str(tmp_path)], check=True)
    mf = parse_manifest((tmp_path / "web-01.mf").read_bytes())
    assert set(mf) == {"web-01.ovf", "web-01-disk1.vmdk", "web-01-disk2.vmdk"}
    for name, (algo, digest) in mf.items():
        assert algo == "sha256"
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    res = subprocess.run(
        ["sha256sum", "-c", "-"],
        input="".join(f"{h}  {n}\n" for n, (_, h) in mf.items()),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for i, src in enumerate(ova["srcs"], 1):
        disk = tmp_path / f"web-01-disk{i}.vmdk"
        qemu.check(disk, "vmdk")
        qemu.compare(src, disk, "raw", "vmdk")
        assert qemu.info(disk)["format-specific"]["data"]["create-type"] == "streamOptimized"
    # the OVF's File sizes are the members' sizes
    with tarfile.open(ova["path"]) as tf:
        sizes = {m.name: m.size for m in tf.getmembers()}
    _, files = parse_ovf((tmp_path / "web-01.ovf").read_bytes())
    assert {f.href: f.size for f in files} == {
        k: v for k, v in sizes.items() if k.endswith(".vmdk")
    }


def test_ovf_round_trip(ova):
    with Package(ova["path"]) as pkg:
        vm = pkg.vm
    want = ova["vm"]
    assert (vm.name, vm.id, vm.cpus, vm.memory_mib, vm.firmware, vm.guest_os) == (
        want.name,
        want.id,
        want.cpus,
        want.memory_mib,
        want.firmware,
        want.guest_os,
    )
    assert [(d.name, d.capacity, d.controller) for d in vm.disks] == [
        (d.name, d.capacity, d.controller) for d in want.disks
    ]
    assert [n.model_dump() for n in vm.nics] == [n.model_dump() for n in want.nics]
    assert vm.annotations == want.annotations


def test_ovf_xml_shape():
    vm = _vm([MiB])
    from hypersdk.ovf import DiskFile

    xml = build_ovf(vm, [DiskFile(vm.disks[0], "d.vmdk", "file1", "vmdisk1", 1234)])
    text = xml.decode()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert 'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"' in text
    assert "vmdk.html#streamOptimized" in text
    assert "<rasd:ResourceType>17</rasd:ResourceType>" in text
    assert "<rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>" in text
    assert "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>" in text
    assert 'vmw:key="firmware" vmw:value="efi"' in text
    for bad in (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>',
        b"<Envelope><unclosed></Envelope>",
        b"<NotOvf/>",
        b"<Envelope/>",
    ):
        with pytest.raises(FormatError):
            parse_ovf(bad, "x.ovf")


def test_ova_source_lists_and_reads(ova):
    with open_source(f"ova://{ova['path']}") as source:
        vms = source.list_vms()
        assert [v.name for v in vms] == ["web-01"]
        with pytest.raises(VMNotFoundError):
            source.get_vm("nope")
        with source.snapshot("web-01") as snap:
            assert snap.consistency == "clone"
            for disk, src in zip(snap.vm.disks, ova["srcs"], strict=True):
                changes = source.changed_extents(snap, disk, None)
                assert not changes.incremental and changes.note == ""
                again = source.changed_extents(snap, disk, "some-change-id")
                assert not again.incremental and "full export" in again.note
                assert again.extents == changes.extents
                data = src.read_bytes()
                img = source.open_disk(snap, disk)
                try:
                    assert img.read(0, len(data)) == data
                    for e in changes.extents:  # extents cover every non-zero byte
                        assert e.end <= img.virtual_size
                finally:
                    img.close()
                covered = bytearray(len(data))
                for e in changes.extents:
                    covered[e.offset : min(e.end, len(data))] = data[
                        e.offset : min(e.end, len(data))
                    ]
                assert bytes(covered) == data


def test_ovf_directory_source(ova, tmp_path):
    tar = need_tool("tar")
    subprocess.run([tar, "xf", str(ova["path"]), "-C", str(tmp_path)], check=True)
    with open_source(f"ova://{tmp_path}") as source:
        [vm] = source.list_vms()
        with source.snapshot(vm.name) as snap:
            img = source.open_disk(snap, vm.disks[1])
            try:
                assert img.read(0, ova["srcs"][1].stat().st_size) == ova["srcs"][1].read_bytes()
            finally:
                img.close()
    pkg = Package(tmp_path / "web-01.ovf")
    try:
        assert pkg.verify_manifest() == []
    finally:
        pkg.close()


def test_single_disk_convert_and_probe(tmp_path):
    src = _disk(tmp_path / "disk.raw", 8 * MiB + 777, 3)
    out = tmp_path / "appliance.ova"
    convert_file(src, out, "ova")
    with open_image(out) as img:  # probed
        assert img.format == "ova" and img.info()["vm"] == "appliance"
        assert img.check() == []
    back = tmp_path / "back.raw"
    convert_file(out, back, "raw")
    qemu.compare(src, back, "raw", "raw")
    with Package(out) as pkg:
        assert pkg.vm.disks[0].capacity == -(-src.stat().st_size // 512) * 512
    # the CLI path
    import sys

    hyperctl = str(Path(sys.executable).with_name("hyperctl"))
    cli_out = tmp_path / "cli.ova"
    res = subprocess.run(
        [hyperctl, "convert", "-q", str(src), str(cli_out), "-O", "ova"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    with Package(cli_out) as pkg:
        assert pkg.verify_manifest() == []


def test_hostile_packages(ova, tmp_path):
    data = ova["path"].read_bytes()
    trunc = tmp_path / "t.ova"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        Package(trunc)
    # .ovf not first
    wrong = tmp_path / "w.ova"
    with open(wrong, "wb") as f:
        body = b"hello"
        f.write(tar_header("readme.txt", len(body), 0) + body + bytes(512 - len(body)))
        f.write(bytes(1024))
    with pytest.raises(FormatError, match="first member"):
        Package(wrong)
    # an href escaping the package
    with Package(ova["path"]) as good:
        evil_ovf = good.ovf_bytes.replace(b"web-01-disk1.vmdk", b"../x.vmdk")
    d = tmp_path / "evil"
    d.mkdir()
    (d / "e.ovf").write_bytes(evil_ovf)
    pkg = Package(d)
    try:
        with pytest.raises(FormatError, match=r"\.\."):
            pkg.open_disk(pkg.disk_files[0])
    finally:
        pkg.close()
    # a bad checksum
    bad = bytearray(data)
    bad[10] ^= 0xFF
    badp = tmp_path / "c.ova"
    badp.write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="checksum"):
        Package(badp)


def test_big_member_uses_pax(tmp_path):
    """Members of 8 GiB or more get a pax size record that tar tools and our reader follow."""
    size = 9 * 1024**3
    p = tmp_path / "big.tar"
    with open(p, "wb") as f:
        f.write(tar_header("big.vmdk", size, 0))
        f.truncate(f.tell() + size)
        f.seek(0, 2)
        f.write(bytes(1024))
    with FileRangeReader(p) as r:
        [m] = list(tar_members(r))
    assert (m.name, m.size) == ("big.vmdk", size)
    with tarfile.open(p) as tf:
        assert [(x.name, x.size) for x in tf.getmembers()] == [("big.vmdk", size)]


VMWARE_OVF = b"""<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.0, UTC time: 2023-01-01T00:00:00.000000Z-->
<Envelope vmw:buildId="build-16360560" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="photon-disk1.vmdk" ovf:id="file1" ovf:size="123456"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
      ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
      ovf:populatedSize="1048576"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="photon">
    <Info>A virtual machine</Info>
    <Name>photon</Name>
    <OperatingSystemSection ovf:id="36" vmw:osType="vmwarePhoton64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>photon</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>
        <rasd:ElementName>2GB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def test_parses_vmware_style_ovf():
    vm, files = parse_ovf(VMWARE_OVF, "photon.ovf")
    assert (vm.name, vm.id, vm.cpus, vm.memory_mib, vm.firmware) == (
        "photon",
        "photon",
        2,
        2048,
        "efi",
    )
    assert vm.guest_os == "vmwarePhoton64Guest"
    [disk] = vm.disks
    assert (disk.name, disk.capacity, disk.controller) == (
        "Hard disk 1",
        16 * 1024**3,
        "SCSI controller 0",
    )
    assert [(f.href, f.size, f.populated) for f in files] == [
        ("photon-disk1.vmdk", 123456, 1048576)
    ]
    [nic] = vm.nics
    assert (nic.name, nic.network, nic.adapter) == ("Network adapter 1", "VM Network", "vmxnet3")


def test_fuzz_ova_headers(tmp_path):
    """Mutated tar headers and descriptors: a FormatError or a readable package, never a hang."""
    src = _disk(tmp_path / "d.raw", 2 * MiB, 5)
    good = tmp_path / "g.ova"
    convert_file(src, good, "ova")
    data = good.read_bytes()
    with Package(good) as pkg:
        ovf_len = len(pkg.ovf_bytes)
    spots = [0, 100, 124, 148, 156, 257, 345, 512, 512 + ovf_len // 2, 1024 + ovf_len]
    rng = random.Random(11)
    p = tmp_path / "m.ova"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        buf = bytearray(data)
        at = rng.choice(spots) + rng.randrange(12)
        for i in range(at, min(len(buf), at + rng.randint(1, 8))):
            buf[i] = rng.randrange(256)
        p.write_bytes(bytes(buf))
        try:
            with Package(p) as pkg:
                img = pkg.open_disk(pkg.disk_files[0])
                try:
                    img.read(0, min(img.virtual_size, MiB))
                finally:
                    img.close()
            outcomes["ok"] += 1
        except FormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 30, outcomes
    with pytest.raises(FormatError, match="capacity"):
        parse_ovf(VMWARE_OVF.replace(b'ovf:capacity="16"', b'ovf:capacity="-16"'), "x.ovf")
    with pytest.raises(FormatError, match="unknown disk"):
        parse_ovf(VMWARE_OVF.replace(b"ovf:/disk/vmdisk1", b"ovf:/disk/nope"), "x.ovf")
