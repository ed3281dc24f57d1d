"""OVF descriptors and OVA packages: written by us, judged by tar, sha256 and qemu-img; read back
through the ova source; hostile packages refused."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hypersdk.atomic import atomic_file
from hypersdk.convert import convert_file
from hypersdk.errors import FormatError, UnsupportedFormatError, VMNotFoundError
from hypersdk.formats import open_image
from hypersdk.formats.ova import Package, tar_header, tar_members, write_ova
from hypersdk.io import FileRangeReader
from hypersdk.models import DiskInfo, NicInfo, VMInfo
from hypersdk.ovf import build_ovf, parse_manifest, parse_ovf
from providers import open_source
from tests import qemu
from tests.fixtures.tools import need_tool
from tests.packages import QCOW2_URL, RAW_URL, UNKNOWN_URL, VMDK_URL, make_ova, one_disk_ovf

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


# ------------------------------------------------------------------------ hostile descriptors
def _with_doctype(ovf: bytes, doctype: str, name_text: str, encoding: str) -> bytes:
    """``ovf`` re-encoded in ``encoding`` with ``doctype`` and the VM's name set to
    ``name_text`` (an entity reference, say)."""
    text = ovf.decode().replace('encoding="UTF-8"', f'encoding="{encoding}"', 1)
    head, _, body = text.partition("\n")
    body = body.replace("<ovf:Name>vm</ovf:Name>", f"<ovf:Name>{name_text}</ovf:Name>", 1)
    return f"{head}\n{doctype}\n{body}".encode(encoding)


_LAUGHS = (
    '<!DOCTYPE ovf:Envelope [<!ENTITY a "lol">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
    + "]>"
)


@pytest.mark.parametrize(
    "doctype,name_text",
    [
        ('<!DOCTYPE ovf:Envelope [<!ENTITY n "INJECTED">]>', "&n;"),
        ('<!DOCTYPE ovf:Envelope [<!ENTITY n SYSTEM "file:///etc/hostname">]>', "&n;"),
        (_LAUGHS, "&j;"),
        ('<!DOCTYPE ovf:Envelope SYSTEM "http://127.0.0.1:9/evil.dtd">', "vm"),
    ],
    ids=["internal", "external", "laughs", "external-dtd"],
)
def test_ovf_entities_refused_in_any_encoding(doctype, name_text):
    """Whatever the encoding (a UTF-16 DOCTYPE slipped past a byte search), a DTD is refused
    before any entity reaches a name."""
    ovf = one_disk_ovf("d.raw", MiB, RAW_URL)
    assert parse_ovf(ovf, "x.ovf")[0].name == "vm"
    for encoding in ("UTF-16", "UTF-16BE", "UTF-8"):
        with pytest.raises(FormatError, match="x.ovf: OVF descriptor declares a DOCTYPE"):
            parse_ovf(_with_doctype(ovf, doctype, name_text, encoding), "x.ovf")


def test_ovf_depth_and_size_bounded():
    ovf = one_disk_ovf("d.raw", MiB, RAW_URL).decode()
    deep = ovf.replace("<ovf:Name>vm</ovf:Name>", "<x>" * 100_000 + "</x>" * 100_000, 1)
    with pytest.raises(FormatError, match="deeper than 64 levels"):
        parse_ovf(deep.encode(), "deep.ovf")
    wide = ovf.replace("<ovf:Name>vm</ovf:Name>", "<x/>" * 300_000, 1)
    with pytest.raises(FormatError, match="more than 200000 elements"):
        parse_ovf(wide.encode(), "wide.ovf")
    with pytest.raises(FormatError, match="not well-formed"):
        parse_ovf(ovf.replace('encoding="UTF-8"', 'encoding="no-such"').encode(), "enc.ovf")


def test_names_with_control_characters_are_escaped_when_shown(tmp_path):
    """A VM name with a C1 CSI and a right-to-left override is shown escaped by hyperctl."""
    name = "evil\x9b2J\u202eexe"
    disk = b"guest data".ljust(MiB, b"\0")
    ova = make_ova(
        tmp_path / "n.ova",
        [("n.ovf", one_disk_ovf("d\x9b.raw", MiB, RAW_URL, name)), ("d\x9b.raw", disk)],
    )
    with Package(ova) as pkg:
        assert pkg.vm.name == name  # kept as it is; escaped where it is shown
        with pkg.open_disk(pkg.disk_files[0]) as img:
            assert "\x9b" not in img.reader.name and "\\x9b" in img.reader.name
    res = subprocess.run(
        [sys.executable, "-m", "hypersdk.cli.main", "info", str(ova)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "vm: evil\\x9b2J\\u202eexe" in res.stdout
    assert "\x9b" not in res.stdout and "\u202e" not in res.stdout


# ------------------------------------------------------------------ references out of a package
def _ovf_dir(tmp_path: Path, href: str) -> Path:
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "vm.ovf").write_bytes(one_disk_ovf(href, MiB, RAW_URL))
    return d


def _marker(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = outside / "host-file"
    marker.write_bytes(b"HOST-SECRET " * 100_000)
    return marker


@pytest.mark.parametrize(
    "how",
    ["file-link", "dir-link", "ovf-link", "absolute-link", "vmdk-extent-link", "manifest-link"],
)
def test_ovf_directory_never_reads_outside(tmp_path, how):
    """A disk href (or the descriptor) that is a symlink, or reaches through one, out of the
    package directory is refused; nothing of the outside file is read. (A link that stays
    inside is fine: only where it leads counts.)"""
    marker = _marker(tmp_path)
    if how == "file-link":
        d = _ovf_dir(tmp_path, "disk.raw")
        (d / "real.raw").write_bytes(b"inside".ljust(MiB, b"\0"))
        (d / "disk.raw").symlink_to("real.raw")  # a link that stays inside is fine
        with Package(d) as pkg, pkg.open_disk(pkg.disk_files[0]) as img:
            assert img.read(0, 6) == b"inside"
        (d / "disk.raw").unlink()
        (d / "disk.raw").symlink_to(marker)
    elif how == "dir-link":
        d = _ovf_dir(tmp_path, "sub/host-file")
        (d / "sub").symlink_to(marker.parent)
    elif how == "absolute-link":
        d = _ovf_dir(tmp_path, "disk.raw")
        (d / "disk.raw").symlink_to("/etc/hostname")
    elif how == "vmdk-extent-link":  # a descriptor in the package naming its flat extent
        d = tmp_path / "pkg"
        d.mkdir()
        (d / "vm.ovf").write_bytes(one_disk_ovf("disk.vmdk", MiB, VMDK_URL))
        qemu.run(
            "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(d / "disk.vmdk"), "1M"
        )
        (d / "disk-flat.vmdk").unlink()
        (d / "disk-flat.vmdk").symlink_to(marker)
    elif how == "manifest-link":  # checking the package must not read a linked manifest
        d = _ovf_dir(tmp_path, "disk.raw")
        (d / "disk.raw").write_bytes(bytes(MiB))
        (d / "vm.mf").symlink_to(marker)
        with Package(d) as pkg, pytest.raises(FormatError, match="outside the image's dir"):
            pkg.verify_manifest()
        return
    else:
        marker.with_suffix(".ovf").write_bytes(one_disk_ovf("host-file", MiB, RAW_URL))
        d = tmp_path / "pkg"
        d.mkdir()
        (d / "vm.ovf").symlink_to(marker.with_suffix(".ovf"))
        with pytest.raises(FormatError, match="outside the package directory"):
            Package(d)
        return
    with (
        open_source(f"ova://{d}") as source,
        source.snapshot("vm") as snap,
        pytest.raises(FormatError, match="outside the image's directory"),
    ):
        source.open_disk(snap, snap.vm.disks[0])


def _backed_qcow2(tmp_path: Path) -> tuple[Path, bytes]:
    """A qcow2 (made by qemu-img) whose backing file is a host file holding a marker."""
    marker = _marker(tmp_path)
    disk = tmp_path / "disk.qcow2"
    qemu.run("create", "-f", "qcow2", "-b", str(marker), "-F", "raw", str(disk))
    assert disk.exists()
    return marker, disk.read_bytes()


@pytest.mark.parametrize("url", [QCOW2_URL, UNKNOWN_URL])
def test_ova_qcow2_backing_never_reaches_host(tmp_path, url):
    """An OVA whose disk is a qcow2 naming a host file as its backing file: refused, naming the
    file, through the format driver, the ova source and hyperctl convert; no byte of the host
    file reaches an output."""
    marker, qcow = _backed_qcow2(tmp_path)
    ova = make_ova(
        tmp_path / "evil.ova", [("evil.ovf", one_disk_ovf("d.qcow2", MiB, url)), ("d.qcow2", qcow)]
    )
    with pytest.raises(FormatError, match=str(marker)):
        open_image(ova)
    with (
        open_source(f"ova://{ova}") as source,
        source.snapshot("vm") as snap,
        pytest.raises(FormatError, match=str(marker)),
    ):
        source.open_disk(snap, snap.vm.disks[0])
    out = tmp_path / "out.raw"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypersdk.cli.main",
            "convert",
            "-q",
            "-O",
            "raw",
            str(ova),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and str(marker) in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p != marker]
    assert not any(b"HOST-SECRET" in p.read_bytes() for p in leftovers)


def test_declared_raw_disk_is_never_probed(tmp_path):
    """A disk the OVF declares raw is read as raw even when its bytes start like a qcow2 (a
    guest's data may); only a disk of unknown format is probed."""
    qcow = tmp_path / "inner.qcow2"
    qemu.run("create", "-f", "qcow2", str(qcow), "1M")
    data = qcow.read_bytes().ljust(MiB, b"\0")
    for url, fmt in ((RAW_URL, "raw"), (UNKNOWN_URL, "qcow2")):
        ova = make_ova(
            tmp_path / f"{fmt}.ova", [("p.ovf", one_disk_ovf("d", MiB, url)), ("d", data)]
        )
        with Package(ova) as pkg, pkg.open_disk(pkg.disk_files[0]) as img:
            assert img.format == fmt
            if fmt == "raw":
                assert img.read(0, MiB) == data


def test_package_in_package_and_refused_formats(tmp_path):
    """A probed disk that is itself an OVA, or a format recognised but not read, is refused by
    name, never read as raw."""
    inner = make_ova(tmp_path / "inner.ova", [("i.ovf", one_disk_ovf("x", 512, RAW_URL)),
                                              ("x", bytes(512))])  # fmt: skip
    outer = make_ova(
        tmp_path / "outer.ova",
        [("o.ovf", one_disk_ovf("inner.ova", MiB, UNKNOWN_URL)), ("inner.ova", inner.read_bytes())],
    )
    with Package(outer) as pkg, pytest.raises(FormatError, match="itself a package"):
        pkg.open_disk(pkg.disk_files[0])
    qed = b"QED\0".ljust(MiB, b"\0")
    ova = make_ova(tmp_path / "q.ova", [("q.ovf", one_disk_ovf("d.qed", MiB, UNKNOWN_URL)),
                                        ("d.qed", qed)])  # fmt: skip
    with Package(ova) as pkg, pytest.raises(UnsupportedFormatError, match=r"q.ova:d.qed: a QED"):
        pkg.open_disk(pkg.disk_files[0])
