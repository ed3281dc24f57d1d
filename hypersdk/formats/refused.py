"""Formats we recognise but do not read: refused by name, never read as raw.

Without these, probing falls back to raw for any magic no reader claims, so a QED image, a LUKS
volume or an ESXi seSparse extent would be "converted" as its container bytes: an output that
looks fine and boots nothing. Each entry here matches the format's magic (as qemu's probe
does, from its sources and specs) and answers with an UnsupportedFormatError that names the
format and says what to do. Naming the format (``-f qed``) is refused the same way by
``hypersdk.formats.get_driver``. A raw disk whose guest data merely starts with such bytes (a
whole-disk LUKS volume exported raw) still converts with ``-f raw``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from hypersdk.errors import UnsupportedFormatError
from hypersdk.formats.base import DiskImage, FormatDriver
from hypersdk.io import RangeReader


@dataclass(frozen=True, eq=False)
class RefusedFormat(FormatDriver):
    """A format recognised by its magic and refused by name."""

    kind: ClassVar[str] = "refused"
    can_write: ClassVar[bool] = False
    # above every reader: a refused magic is never the same as a read one (qcow v1 vs qcow2)
    probe_priority: ClassVar[int] = 20

    name: str  # type: ignore[misc]  # an instance attribute here: one class, many formats
    what: str  # "a QED image (qemu enhanced disk)"
    advice: str  # what to do instead
    head: Callable[[bytes], bool] = lambda _head: False
    tail: Callable[[bytes], bool] = lambda _tail: False
    aliases: tuple[str, ...] = ()  # type: ignore[misc]

    def probe(self, head: bytes, size: int) -> bool:
        return self.head(head)

    def probe_tail(self, tail: bytes, size: int) -> bool:
        return self.tail(tail)

    def refusal(self) -> str:
        """What the format is and what to do, for a message about it."""
        return f"{self.what}, which is not read here: {self.advice}"

    def open(self, reader: RangeReader) -> DiskImage:
        raise UnsupportedFormatError(
            reader.name,
            f"{self.refusal()} (a raw disk image whose data merely starts like this converts "
            "with -f raw)",
        )


def _u32be(head: bytes, at: int) -> int | None:
    return struct.unpack_from(">I", head, at)[0] if len(head) >= at + 4 else None


def _cstr(head: bytes, at: int, text: bytes) -> bool:
    """A NUL-terminated string ``text`` at ``at`` (bochs headers)."""
    return head[at : at + len(text) + 1] == text + b"\0"


_CLOOP_V2 = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)

DRIVERS = [
    RefusedFormat(
        "sesparse",
        "an ESXi seSparse extent (a snapshot's data file)",
        "open its descriptor .vmdk instead, which names this file",
        head=lambda h: h[:8] == struct.pack("<Q", 0xCAFEBABE),
    ),
    RefusedFormat(
        "qcow",
        "a QCOW version 1 image (qemu's old format)",
        "convert it to qcow2 first: qemu-img convert -f qcow -O qcow2 IN OUT",
        head=lambda h: h[:4] == b"QFI\xfb" and _u32be(h, 4) == 1,
        aliases=("qcow1",),
    ),
    RefusedFormat(
        "qed",
        "a QED image (qemu enhanced disk)",
        "convert it to qcow2 first: qemu-img convert -f qed -O qcow2 IN OUT",
        head=lambda h: h[:4] == b"QED\0",
    ),
    RefusedFormat(
        "luks",
        "a LUKS encrypted volume",
        "decrypt it first (cryptsetup open, or qemu-img convert with its secret) and convert "
        "the plain disk",
        head=lambda h: h[:6] == b"LUKS\xba\xbe" and h[6:8] in (b"\0\1", b"\0\2"),
    ),
    RefusedFormat(
        "bochs",
        "a Bochs growing image",
        "convert it first: qemu-img convert -f bochs -O qcow2 IN OUT",
        head=lambda h: (
            _cstr(h, 0, b"Bochs Virtual HD Image")
            and _cstr(h, 32, b"Redolog")
            and _cstr(h, 48, b"Growing")
        ),
    ),
    RefusedFormat(
        "cloop",
        "a cloop compressed image",
        "convert it first: qemu-img convert -f cloop -O raw IN OUT",
        head=lambda h: len(h) > len(_CLOOP_V2) and h.startswith(_CLOOP_V2),
    ),
    RefusedFormat(
        "dmg",
        "an Apple disk image (UDIF .dmg)",
        "convert it first: qemu-img convert -f dmg -O raw IN OUT (or hdiutil convert)",
        tail=lambda t: t[:4] == b"koly" and _u32be(t, 4) == 4 and _u32be(t, 8) == 512,
    ),
    RefusedFormat(
        "gzip",
        "a gzip-compressed file",
        "decompress it first (gunzip)",
        head=lambda h: h[:3] == b"\x1f\x8b\x08",
    ),
    RefusedFormat(
        "xz",
        "an xz-compressed file",
        "decompress it first (xz -d)",
        head=lambda h: h[:6] == b"\xfd7zXZ\0",
    ),
    RefusedFormat(
        "zstd",
        "a zstd-compressed file",
        "decompress it first (zstd -d)",
        head=lambda h: h[:4] == b"\x28\xb5\x2f\xfd",
    ),
    RefusedFormat(
        "bzip2",
        "a bzip2-compressed file",
        "decompress it first (bunzip2)",
        head=lambda h: h[:3] == b"BZh" and h[3:4] in b"123456789" and h[4:10] == b"1AY&SY",
    ),
]
