"""VMDK text descriptors: parsing (``key = "value"`` lines and extent lines) and building."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from hypersdk.errors import FormatError
from hypersdk.formats import _vmdk_layout as L

SECTOR = L.SECTOR

_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$', re.IGNORECASE
)


@dataclass
class ExtentLine:
    access: str
    sectors: int
    kind: str  # SPARSE, FLAT, VMFS, ZERO
    filename: str | None
    offset: int  # sectors into the file (flat extents)


@dataclass
class Descriptor:
    fields: dict[str, str]
    extents: list[ExtentLine]

    @property
    def create_type(self) -> str:
        return self.fields.get("createtype", "")


def parse_descriptor(text: str, name: str) -> Descriptor:
    """Parse a text descriptor (``key = "value"`` lines and extent lines)."""
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for raw in text.splitlines():
        line = raw.strip().rstrip("\x00")
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            extents.append(
                ExtentLine(
                    m.group(1).upper(),
                    int(m.group(2)),
                    m.group(3).upper(),
                    m.group(4),
                    int(m.group(5) or 0),
                )
            )
            continue
        if "=" in line:
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip().strip('"')
            continue
        raise FormatError(name, f"descriptor line not understood: {line[:80]!r}")
    return Descriptor(fields, extents)


def build_descriptor(
    create_type: str,
    extents: list[ExtentLine],
    size: int,
    adapter: str,
    hwversion: int,
    cid: int,
) -> str:
    cyl, heads, spt = L.chs_geometry(size)
    if adapter == "ide":  # IDE geometry caps at 16 heads
        heads = 16
        cyl = max(1, min(size // SECTOR // (heads * spt), 16383))
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        "",
        "# Extent description",
    ]
    for e in extents:
        tail = f' "{e.filename}"' + (f" {e.offset}" if e.kind == "FLAT" else "")
        lines.append(f"{e.access} {e.sectors} {e.kind}{tail}")
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{hwversion}"',
        f'ddb.geometry.cylinders = "{cyl}"',
        f'ddb.geometry.heads = "{heads}"',
        f'ddb.geometry.sectors = "{spt}"',
        f'ddb.adapterType = "{adapter}"',
        f'ddb.uuid.image = "{uuid.UUID(int=cid * 0x100000001 << 64 | cid)}"',
        "",
    ]
    return "\n".join(lines)


def descriptor_text(raw: bytes) -> bytes | None:
    """The text of a descriptor file, or None if ``raw`` is not text. Like qemu and VMware, the
    text ends at the first NUL, and only NULs and whitespace may follow: qemu-img 7.2 now and
    then pads a descriptor to 512 bytes as "...\\n\\0\\n\\0\\0...", which it reads back fine."""
    text, _, rest = raw.partition(b"\x00")
    return None if rest.strip(b"\x00 \t\r\n") else text


def decode_descriptor(raw: bytes, name: str) -> Descriptor:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(name, "VMDK descriptor is not UTF-8 text") from None
    return parse_descriptor(text, name)
