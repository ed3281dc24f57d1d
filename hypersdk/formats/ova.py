"""OVA: a POSIX tar of an OVF descriptor, its manifest and streamOptimized VMDK disks.

Writing streams, strictly in order, with bounded memory::

    <vm>.ovf        the descriptor (first, as DSP0243 and VMware require)
    <vm>.mf         SHA256(<file>)= <hex> for the descriptor and every disk
    <vm>-disk1.vmdk streamOptimized VMDK
    ...             two zero blocks end the archive

A tar member header states the member's size before its data, and the manifest (right after the
descriptor, where every reader looks for it) holds the SHA-256 of bytes that come later. A
streamOptimized VMDK's size and hash depend on compression, so ``write_ova`` makes two passes
over each disk: pass 1 compresses and keeps only the byte count and the SHA-256 (zlib is
deterministic and the layout, CID included, is planned once), pass 2 compresses again and emits.
Nothing is staged; the cost is compressing twice (both passes on two cores). Pass 2 re-hashes and
refuses to finish if the source changed in between. Members of 8 GiB or more get a POSIX.1-2001
pax size record (ustar's octal field stops at 8 GiB).

As a FormatDriver (``-O ova``) one disk becomes a one-disk VM named after the output file.
Reading (``-f ova`` or probed) opens the first disk of the package: a RangeReader over the tar
member's bytes, then the VMDK (or any probed) driver on it.

Reading is confined to the package. An OVA's members are read through ``SliceReader``s, never a
local-file reader, so an image inside (a qcow2 naming a backing file) cannot reach the host's
files. An OVF directory's files are resolved with ``hypersdk.references``: after symlinks they
must lie in the descriptor's own directory and be regular files (a FIFO would hang the read).

Which driver reads a disk: the one the OVF's disk format URL names (VMDK, qcow2, VHD, VHDX, VDI,
or raw as oVirt and virt-v2v write it, ``http://en.wikipedia.org/wiki/Byte``). Only a disk with
no format URL, or one we do not know, is probed, as a lone image would be (a format we
recognise but do not read is refused by name, a package inside a package is refused). A disk
the OVF declares raw is never probed: its bytes are the guest's and may start with any magic.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.formats.vmdk import DRIVER as VMDK
from hypersdk.formats.vmdk import VmdkLayout
from hypersdk.io import FileRangeReader, RangeReader, Sink, write_zero_bytes
from hypersdk.references import printable, require_regular, resolve_reference

if TYPE_CHECKING:
    from hypersdk.models import DiskInfo, VMInfo
    from hypersdk.ovf import DiskFile

# hypersdk.ovf (XML) is imported where an OVA is actually read or written: every image probe
# loads this driver, and a qcow2 convert should not pay for an XML parser.

BLOCK = 512
MAX_META_MEMBER = 16 * 1024 * 1024  # .ovf, .mf, pax headers: anything bigger is refused
MAX_MEMBERS = 10_000  # files in an OVA (a descriptor, a manifest, a disk or a few each)
_ZERO_BLOCK = bytes(BLOCK)


# ------------------------------------------------------------------------------------ tar
def tar_header(name: str, size: int, mtime: int) -> bytes:
    """A ustar header for a regular file (with a pax record first when size >= 8 GiB)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    fmt = tarfile.USTAR_FORMAT if size < 8**11 and len(name) < 100 else tarfile.PAX_FORMAT
    return info.tobuf(format=fmt, encoding="utf-8", errors="strict")


@dataclass
class Member:
    name: str
    offset: int  # of the data in the archive
    size: int


def _octal(field_: bytes, what: str, name: str) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field_[1:], "big")
        return value
    text = field_.split(b"\x00", 1)[0].strip().decode("ascii", "replace")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise FormatError(name, f"tar header {what} {text!r} is not octal") from None


def _pax(data: bytes, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError(name, "malformed pax header record") from None
        if length <= 0 or pos + length > len(data):
            raise FormatError(name, "malformed pax header record length")
        rec = data[sp + 1 : pos + length - 1].decode("utf-8", "replace")
        k, _, v = rec.partition("=")
        out[k] = v
        pos += length
    return out


def tar_members(reader: RangeReader) -> Iterator[Member]:
    """Regular-file members of a tar archive (ustar, pax and GNU long names), in order."""
    name = reader.name
    pos = 0
    pending: dict[str, str] = {}
    while pos + BLOCK <= reader.size:
        hdr = reader.read(pos, BLOCK)
        if hdr == _ZERO_BLOCK:
            return
        stored = _octal(hdr[148:156], "checksum", name)
        if stored != sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]):
            raise FormatError(
                name, f"tar header at {pos} has a bad checksum: not an OVA or corrupt"
            )
        size = _octal(hdr[124:136], "size", name)
        kind = hdr[156:157]
        member = hdr[0:100].split(b"\x00", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\x00"):
            member = hdr[345:500].split(b"\x00", 1)[0] + b"/" + member
        data_at = pos + BLOCK
        if "size" in pending:
            try:
                size = int(pending.pop("size"))
            except ValueError:
                raise FormatError(name, "pax size record is not a number") from None
        if size < 0:
            raise FormatError(name, f"tar member at {pos} has a negative size")
        if data_at + size > reader.size:
            raise FormatError(
                name, f"tar member at {pos} needs {size} bytes, the archive ends first: truncated"
            )
        if kind in (b"x", b"g", b"L"):
            if size > MAX_META_MEMBER:
                raise FormatError(name, f"tar extended header of {size} bytes is implausible")
            raw = reader.read(data_at, size)
            if kind == b"x":
                pending.update(_pax(raw, name))
            elif kind == b"L":
                pending["path"] = raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
        elif kind in (b"0", b"\x00", b"7"):
            text = pending.pop("path", None) or member.decode("utf-8", "replace")
            pending.clear()
            yield Member(text, data_at, size)
        else:
            pending.clear()
        pos = data_at + -(-size // BLOCK) * BLOCK


class SliceReader:
    """A RangeReader over ``size`` bytes of ``base`` starting at ``offset`` (a tar member)."""

    def __init__(self, base: RangeReader, offset: int, size: int, name: str, owns: bool = False):
        self.base = base
        self.offset = offset
        self.size = size
        self.name = printable(name)  # member names come from the archive: shown in messages
        self._owns = owns

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(self.name, f"read {offset}+{length} beyond member end {self.size}")
        return self.base.read(self.offset + offset, length)

    def close(self) -> None:
        if self._owns:
            self.base.close()


# -------------------------------------------------------------------------------- package
def _safe_name(name: str, where: str) -> str:
    norm = name.replace("\\", "/")
    if not norm or norm.startswith("/") or ".." in norm.split("/"):
        raise FormatError(where, f"file reference {name!r} must be a relative name without '..'")
    return norm


# OVF disk format URLs -> the driver that reads them (first match; "vhdx" before "vhd")
_FORMAT_URLS = (
    ("vmdk", "vmdk"),
    ("qcow", "qcow2"),  # oVirt: http://www.gnome.org/~markmc/qcow-image-format.html
    ("vhdx", "vhdx"),
    ("vhd", "vhd"),
    ("bb676673", "vhd"),  # Citrix: technet.microsoft.com/.../bb676673.aspx, the VHD spec
    ("vdi", "vdi"),
    ("wiki/byte", "raw"),  # oVirt, virt-v2v: http://en.wikipedia.org/wiki/Byte
)


def declared_format(url: str) -> str | None:
    """The driver an OVF disk format URL names, or None (no URL, or one we do not know)."""
    low = url.lower()
    return next((fmt for key, fmt in _FORMAT_URLS if key in low), None)


class Package:
    """An OVA file, an OVF directory or an .ovf file: the VM and random reads of its disks."""

    def __init__(self, path: str | os.PathLike, archive: RangeReader | None = None):
        self.path = os.path.abspath(os.fspath(path)) if archive is None else archive.name
        self._archive: RangeReader | None = None
        self.members: dict[str, Member] = {}
        self.ovf_path: str | None = None  # the descriptor's path, when it is a local file
        if archive is not None:
            self.dir = None
            self._archive = archive
            self._index()
        elif os.path.isdir(self.path):
            ovfs = sorted(p for p in os.listdir(self.path) if p.lower().endswith(".ovf"))
            if len(ovfs) != 1:
                raise FormatError(self.path, f"expected one .ovf descriptor, found {len(ovfs)}")
            self.dir = self.path
            self.ovf_name = ovfs[0]
            self.ovf_path = os.path.join(self.dir, self.ovf_name)
            real = os.path.realpath(self.ovf_path)
            if os.path.dirname(real) != os.path.realpath(self.dir):
                raise FormatError(
                    self.ovf_path,
                    f"OVF descriptor resolves to {printable(real)}, outside the package "
                    "directory: refused",
                )
            self.ovf_bytes = self._read_file(self.ovf_path)
        elif self.path.lower().endswith(".ovf"):
            self.dir = os.path.dirname(self.path)
            self.ovf_name = os.path.basename(self.path)
            self.ovf_path = self.path
            self.ovf_bytes = self._read_file(self.path)
        else:
            self.dir = None
            self._archive = FileRangeReader(self.path)
            try:
                self._index()
            except BaseException:
                self.close()
                raise
        from hypersdk.ovf import parse_ovf

        self.vm, self.disk_files = parse_ovf(self.ovf_bytes, printable(self.ovf_name))

    @staticmethod
    def _read_file(path: str) -> bytes:
        require_regular(path, "OVF descriptor")  # a FIFO would hang the read, a device is no OVF
        reader = FileRangeReader(path)
        try:
            if reader.size > MAX_META_MEMBER:
                raise FormatError(path, "OVF descriptor is implausibly big")
            return reader.read(0, reader.size)
        finally:
            reader.close()

    def _index(self) -> None:
        assert self._archive is not None
        for n, m in enumerate(tar_members(self._archive)):
            if n == MAX_MEMBERS:  # the index is held in memory; an OVA has a handful
                raise FormatError(self.path, f"more than {MAX_MEMBERS} files: not an OVA")
            self.members.setdefault(m.name, m)
        if not self.members:
            raise FormatError(self.path, "empty archive: not an OVA")
        first = next(iter(self.members.values()))
        if not first.name.lower().endswith(".ovf"):
            raise FormatError(
                self.path, f"first member is {first.name!r}: an OVA starts with its .ovf"
            )
        if first.size > MAX_META_MEMBER:
            raise FormatError(self.path, "OVF descriptor is implausibly big")
        self.ovf_name = first.name
        self.ovf_bytes = self._archive.read(first.offset, first.size)

    def open_file(self, name: str) -> RangeReader:
        """A reader over a file of the package: a tar member (never a local-file reader, so
        an image inside cannot name host files), or a regular file in the descriptor's own
        directory (hypersdk.references: symlinks out of it are refused)."""
        name = _safe_name(name, self.path)
        if self._archive is not None:
            m = self.members.get(name)
            if m is None:
                raise FormatError(self.path, f"the OVA has no member {name!r}")
            return SliceReader(self._archive, m.offset, m.size, f"{self.path}:{name}")
        full = resolve_reference(self.ovf_path, name, "disk file")
        require_regular(full, "disk file")
        return FileRangeReader(full)

    def has_file(self, name: str) -> bool:
        """Whether the package holds ``name`` (which may still be refused when opened)."""
        try:
            name = _safe_name(name, self.path)
        except FormatError:
            return False
        if self._archive is not None:
            return name in self.members
        assert self.dir is not None
        return os.path.lexists(os.path.join(self.dir, name))

    def open_disk(self, df: DiskFile) -> DiskImage:
        """The disk ``df`` with the driver its OVF format URL names, else a probed one."""
        from hypersdk.formats import get_driver, probe

        reader = self.open_file(df.href)
        try:
            declared = declared_format(df.format)
            driver = get_driver(declared) if declared else probe(reader)
            if driver.kind == "package":  # an OVA as a disk: a package nested in a package
                raise FormatError(reader.name, "a disk of the package is itself a package")
            if driver is VMDK:
                return VMDK.open(reader, opener=self.open_file)
            return driver.open(reader)
        except BaseException:
            reader.close()
            raise

    def manifest(self) -> dict[str, tuple[str, str]]:
        mf = os.path.splitext(self.ovf_name)[0] + ".mf"
        if not self.has_file(mf):
            return {}
        r = self.open_file(mf)
        try:
            if r.size > MAX_META_MEMBER:
                raise FormatError(self.path, "manifest is implausibly big")
            from hypersdk.ovf import parse_manifest

            return parse_manifest(r.read(0, r.size), mf)
        finally:
            r.close()

    def verify_manifest(self) -> list[str]:
        """Files whose SHA-256/SHA-1 digest differs from the manifest (empty: all match)."""
        bad = []
        for fname, (algo, digest) in self.manifest().items():
            h = hashlib.new(algo)
            r = self.open_file(fname)
            try:
                pos = 0
                while pos < r.size:
                    n = min(4 << 20, r.size - pos)
                    h.update(r.read(pos, n))
                    pos += n
            finally:
                r.close()
            if h.hexdigest() != digest:
                bad.append(fname)
        return bad

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------- writer
class _Measure:
    """A Sink that keeps nothing: byte count and SHA-256 only (pass 1)."""

    def __init__(self) -> None:
        self.n = 0
        self.h = hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        self.n += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        write_zero_bytes(self.write, length)

    def tell(self) -> int:
        return self.n


class _Forward(_Measure):
    """Pass 2: forwards to the real sink while counting and hashing."""

    def __init__(self, inner: Sink):
        super().__init__()
        self.inner = inner

    def write(self, data) -> int:
        self.inner.write(data)
        return super().write(data)

    def write_zeros(self, length: int) -> None:
        self.inner.write_zeros(length)
        write_zero_bytes(super().write, length)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "vm"


def disk_member_names(vm: VMInfo, count: int) -> list[str]:
    """The archive member names ``write_ova`` gives the VM's disks, in order."""
    stem = _file_stem(vm.name)
    return [f"{stem}-disk{n}.vmdk" for n in range(1, count + 1)]


def write_ova(
    vm: VMInfo,
    disks: list[tuple[DiskInfo, Readable, ExtentMap]],
    sink: Sink,
    progress: Progress | None = None,
    options: Mapping[str, str] | None = None,
) -> int:
    """Stream an OVA of ``vm`` with ``disks`` (info, guest bytes, data extents) into ``sink``.

    ``options`` go to the VMDK writer (adapter_type, hwversion, compression_level). Progress
    counts guest bytes of both passes. Returns the archive size.
    """
    from hypersdk.ovf import DiskFile, build_manifest, build_ovf

    opts = dict(options or {})
    opts["subformat"] = "streamOptimized"
    stem = _file_stem(vm.name)
    mtime = int(time.time())
    files: list[DiskFile] = []
    plans: list[tuple[VmdkLayout, Readable, str, int]] = []
    infos: list[DiskInfo] = []
    for n, (info, source, extents) in enumerate(disks, 1):
        layout = VMDK.plan(source.size, extents, opts)
        measure = _Measure()
        VMDK.write(source, layout, measure, progress)  # pass 1: size and hash only
        href = disk_member_names(vm, n)[-1]
        files.append(
            DiskFile(info, href, f"file{n}", f"vmdisk{n}", measure.n, populated=extents.data_bytes)
        )
        plans.append((layout, source, measure.h.hexdigest(), measure.n))
        infos.append(info)
    ovf_vm = vm.model_copy(update={"disks": infos})
    ovf = build_ovf(ovf_vm, files)
    ovf_name, mf_name = f"{stem}.ovf", f"{stem}.mf"
    digests = {ovf_name: hashlib.sha256(ovf).hexdigest()}
    digests |= {f.href: h for f, (_, _, h, _) in zip(files, plans, strict=True)}
    mf = build_manifest(digests)
    start = sink.tell()
    for name, data in ((ovf_name, ovf), (mf_name, mf)):
        sink.write(tar_header(name, len(data), mtime))
        sink.write(data)
        sink.write_zeros(-len(data) % BLOCK)
    for f, (layout, source, digest, size) in zip(files, plans, strict=True):
        sink.write(tar_header(f.href, size, mtime))
        fwd = _Forward(sink)
        VMDK.write(source, layout, fwd, progress)  # pass 2: the same bytes, emitted
        if fwd.n != size or fwd.h.hexdigest() != digest:
            raise FormatError(
                None,
                f"disk {f.disk.name!r} changed between the two OVA passes: the source must be "
                "a stable snapshot",
            )
        sink.write_zeros(-size % BLOCK)
    sink.write_zeros(2 * BLOCK)
    return sink.tell() - start


# --------------------------------------------------------------------------------- driver
class OvaImage(DiskImage):
    """The first disk of an OVA/OVF package, whatever its container format."""

    format = "ova"

    def __init__(self, package: Package, inner: DiskImage):
        super().__init__(inner.reader, inner.virtual_size)
        self.name = package.path
        self.package = package
        self.inner = inner

    def extents(self) -> ExtentMap:
        return self.inner.extents()

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def info(self) -> dict:
        return {
            "vm": printable(self.package.vm.name),
            "disks": len(self.package.disk_files),
            "disk_format": self.inner.format,
            **{f"disk_{k}": v for k, v in self.inner.info().items()},
        }

    def check(self) -> list[str]:
        problems = [
            f"{n}: digest differs from the manifest" for n in self.package.verify_manifest()
        ]
        return problems + self.inner.check()

    def close(self) -> None:
        self.inner.close()
        self.package.close()


@dataclass
class OvaLayout(Layout):
    vmdk: VmdkLayout | None = None
    vm_name: str = "vm"
    used_size: int = 0
    size_exact: bool = False
    vmdk_options: dict[str, str] = field(default_factory=dict)

    def bind_output(self, path: str | os.PathLike) -> None:
        """Name the VM after the output file unless the ``name`` option set it."""
        if "name" not in self.options:
            base = os.path.basename(os.fspath(path))
            self.vm_name = _file_stem(base[:-4] if base.lower().endswith(".ova") else base)


class OvaDriver(FormatDriver):
    name = "ova"
    kind = "package"
    extensions = (".ova",)
    option_names = ("name", "adapter_type", "hwversion", "compression_level")
    probe_priority = 10

    def probe(self, head: bytes, size: int) -> bool:
        if len(head) < BLOCK or head[257:262] != b"ustar":
            return False
        first = head[:100].split(b"\x00", 1)[0].lower()
        return first.endswith(b".ovf") or head[156:157] == b"x"

    def open(self, reader: RangeReader) -> DiskImage:
        path = reader.name
        package = Package(path, archive=reader)  # owns the reader from here
        try:
            if not package.disk_files:
                raise FormatError(path, "the package holds no disk file")
            inner = package.open_disk(package.disk_files[0])
        except BaseException:
            package.close()
            raise
        return OvaImage(package, inner)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> OvaLayout:
        opts = self.check_options(options)
        vmdk_opts = {k: v for k, v in opts.items() if k != "name"}
        inner = VMDK.plan(size, extents, {**vmdk_opts, "subformat": "streamOptimized"})
        name = opts.get("name", "vm")
        if not name.strip():
            raise InvalidParameterError("ova option name must not be empty")
        # upper bound: headers, descriptor and manifest (a few KiB), the VMDK's own bound
        total = 8 * BLOCK + 64 * 1024 + inner.total_size + 2 * BLOCK
        return OvaLayout(
            virtual_size=size,
            extents=extents,
            total_size=total,
            options=opts,
            vmdk=inner,
            vm_name=_file_stem(name),
            vmdk_options=vmdk_opts,
        )

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        if not isinstance(layout, OvaLayout):
            raise InvalidParameterError("ova write needs a layout from ova plan")
        from hypersdk.models import DiskInfo, VMInfo

        vm = VMInfo(
            name=layout.vm_name,
            id=layout.vm_name,
            disks=[DiskInfo(name="disk0", capacity=layout.virtual_size, controller="scsi0")],
        )
        disk = vm.disks[0]
        layout.used_size = write_ova(
            vm, [(disk, source, layout.extents)], out, progress, layout.vmdk_options
        )


DRIVER = OvaDriver()
