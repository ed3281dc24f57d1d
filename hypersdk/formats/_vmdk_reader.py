"""VMDK reader: a sparse extent on its own (monolithicSparse, streamOptimized) or a text
descriptor naming extents (monolithicFlat, twoGbMaxExtent*, vmfs, seSparse): the image is their
concatenation in guest order (``_vmdk_extents`` makes each extent line into an extent).

A delta disk (its descriptor names a parent: ``_vmdk_parent``) reads its unallocated grains
from the parent, which is ``backing`` as for a qcow2 delta: ``own_extents()`` is the delta's own
data, ``extents()`` adds the parent's data wherever the delta leaves a grain unallocated.

A bare seSparse extent file (the ``-sesparse.vmdk`` beside a snapshot's descriptor) is refused
by name, as ``hypersdk.formats.refused`` refuses it when probed: it is not a disk on its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import cast

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._sesparse import is_sesparse
from hypersdk.formats._vmdk_descriptor import Descriptor, decode_descriptor, descriptor_text
from hypersdk.formats._vmdk_extents import (
    DeltaExtent,
    ExtentFiles,
    Opener,
    SeSparsePart,
    SparsePart,
    VmdkExtent,
    open_extent,
    readable_create_type,
)
from hypersdk.formats._vmdk_parent import ParentLink, cid_field, open_parent
from hypersdk.formats._vmdk_sparse import MAX_CAPACITY, SparseExtent
from hypersdk.formats.base import DiskImage
from hypersdk.io import RangeReader
from hypersdk.references import printable

SECTOR = L.SECTOR
# what a bare seSparse extent is, in the words of hypersdk.formats.refused's probe for it
SESPARSE_ALONE = (
    "an ESXi seSparse extent (a snapshot's data file), not a disk on its own: open its "
    "descriptor .vmdk instead, which names this file"
)

__all__ = ["SESPARSE_ALONE", "Opener", "VmdkImage", "open_vmdk"]


class VmdkImage(DiskImage):
    format = "vmdk"

    def __init__(
        self,
        reader: RangeReader,
        parts: list[VmdkExtent],
        descriptor: Descriptor | None,
        files: ExtentFiles | None = None,
    ):
        super().__init__(reader, sum(p.length for p in parts))
        self.parts = parts
        self.descriptor = descriptor
        self.backing: DiskImage | None = None
        self.parent: ParentLink | None = None
        self._files = files
        self._starts: list[int] = []
        pos = 0
        for p in parts:
            self._starts.append(pos)
            pos += p.length

    def attach_parent(self, parent: DiskImage, link: ParentLink) -> None:
        """Read unallocated grains of every delta extent from ``parent`` (which we then own)."""
        self.backing, self.parent = parent, link
        for start, p in zip(self._starts, self.parts, strict=True):
            if p.delta:
                cast(DeltaExtent, p).set_parent(self._parent_reader(start))

    def _parent_reader(self, start: int):
        def read(offset: int, length: int) -> bytes:
            return self._read_parent(start + offset, length)

        return read

    def _read_parent(self, offset: int, length: int) -> bytes:
        """The parent's bytes; zeros past its end (a parent smaller than the delta)."""
        assert self.backing is not None
        n = max(0, min(length, self.backing.virtual_size - offset))
        data = self.backing.read(offset, n) if n else b""
        return data if n == length else data + bytes(length - n)

    def own_extents(self) -> ExtentMap:
        out = ExtentCollector(self.virtual_size)
        for start, p in zip(self._starts, self.parts, strict=True):  # in guest order
            out.extend(p.iter_extents(start))
        return out.build()

    def extents(self) -> ExtentMap:
        if self.backing is None:
            return self.own_extents()
        out = ExtentCollector(self.virtual_size)
        parent = _Through(self.backing.extents().data(), out)
        for start, p in zip(self._starts, self.parts, strict=True):  # in guest order
            if not p.delta:  # a flat or zero extent defines every byte of its range
                out.extend(p.iter_extents(start))
                continue
            pos = start
            for e in cast(DeltaExtent, p).layer_extents(start):
                parent.show(pos, e.offset)
                if not e.zero:  # a zero grain hides the parent
                    out.add(e.offset, e.length)
                pos = e.end
            parent.show(pos, start + p.length)
        return out.build()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        parts: list[bytes] = []
        pos, end = offset, offset + length
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            p, start = self.parts[i], self._starts[i]
            take = min(end, start + p.length) - pos
            parts.append(p.read(pos - start, take))
            pos += take
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def info(self) -> dict:
        d = self.descriptor.fields if self.descriptor else {}
        first = next((p.sparse for p in self.parts if isinstance(p, SparsePart)), None)
        shown = {k: printable(v) if v is not None else None for k, v in d.items()}
        out = {
            "subformat": shown.get("createtype", "monolithicSparse"),
            "adapter_type": shown.get("ddb.adaptertype"),
            "hwversion": shown.get("ddb.virtualhwversion"),
            "extents": len(self.parts),
        }
        if first is not None:
            out["grain_size"] = first.grain_bytes
            out["compressed"] = first.compressed
        se = next((p.sesparse for p in self.parts if isinstance(p, SeSparsePart)), None)
        if se is not None:
            out["grain_size"] = se.info()["grain_size"]
        if self.descriptor is not None and "cid" in self.descriptor.fields:
            try:
                out["cid"] = f"{cid_field(self.descriptor, 'CID', self.name):08x}"
            except FormatError:
                out["cid"] = shown["cid"]
        if self.parent is not None:
            out["backing_file"] = printable(self.parent.hint)
            out["backing_format"] = "vmdk"
            out["parent_cid"] = f"{self.parent.cid:08x}"
            if self.parent.note:
                out["backing_file_found"] = self.parent.note
        return out

    def check(self) -> list[str]:
        problems: list[str] = []
        for p in self.parts:
            problems.extend(p.check())
        return problems

    def release(self) -> None:
        """Close what the image opened besides its own reader: extent files, the parent."""
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._files is not None:
            self._files.close()
            self._files = None

    def close(self) -> None:
        self.release()
        super().close()


class _Through:
    """The parent's data extents, in order, added to ``out`` where the delta shows them."""

    def __init__(self, extents: Iterator[Extent], out: ExtentCollector):
        self._it = extents
        self._cur = next(extents, None)
        self._out = out

    def show(self, a: int, b: int) -> None:
        """Add the parent's data inside [a, b) (calls come in ascending order)."""
        while self._cur is not None and self._cur.end <= a:
            self._cur = next(self._it, None)
        while self._cur is not None and self._cur.offset < b:
            lo = max(a, self._cur.offset)
            self._out.add(lo, min(b, self._cur.end) - lo)
            if self._cur.end > b:
                break
            self._cur = next(self._it, None)


def open_vmdk(reader: RangeReader, opener: Opener | None = None) -> VmdkImage:
    """Open a sparse VMDK or a text descriptor; ``opener`` resolves extent file names (an OVA's
    members), else they are files confined by hypersdk.references."""
    image = _open_own(reader, opener)
    try:
        found = open_parent(reader, image.name, image.descriptor, in_package=opener is not None)
    except BaseException:
        image.release()
        raise
    if found is not None:
        image.attach_parent(*found)
    return image


def _open_own(reader: RangeReader, opener: Opener | None) -> VmdkImage:
    """The image without its parent."""
    name = reader.name
    head = reader.read(0, min(reader.size, SECTOR))
    if is_sesparse(head):
        raise UnsupportedFormatError(name, SESPARSE_ALONE)
    if head[:4] == L.COWD_MAGIC:
        raise UnsupportedFormatError(
            name, "VMFS sparse (COWD) extent: this VMDK kind is not supported"
        )
    if head[:4] == L.MAGIC_BYTES:
        sp = SparseExtent(reader, name)
        desc = sp.descriptor
        if desc is not None:
            ct = desc.create_type
            if ct and not readable_create_type(ct):
                _refuse_create_type(ct, name)
        return VmdkImage(reader, [SparsePart(sp, sp.capacity)], desc)
    if reader.size > L.MAX_DESCRIPTOR_BYTES:
        raise FormatError(name, "neither a sparse VMDK nor a descriptor (too big for text)")
    text = descriptor_text(reader.read(0, reader.size))
    if text is None:
        raise FormatError(name, "not a VMDK: no sparse magic and not a text descriptor")
    desc = decode_descriptor(text, name)
    ct = desc.create_type
    if not ct:
        raise FormatError(name, "VMDK descriptor has no createType")
    if not readable_create_type(ct):
        _refuse_create_type(ct, name)
    if not desc.extents:
        raise FormatError(name, "VMDK descriptor lists no extents")
    files = ExtentFiles(reader, opener)
    parts: list[VmdkExtent] = []
    pos = 0
    try:
        for e in desc.extents:
            length = e.sectors * SECTOR
            if length > MAX_CAPACITY or pos + length > MAX_CAPACITY:
                raise FormatError(name, f"extent of {e.sectors} sectors is implausible")
            parts.append(open_extent(e, files, length))
            pos += length
        files.finish()
    except BaseException:
        files.close()
        raise
    return VmdkImage(reader, parts, desc, files)


def _refuse_create_type(ct: str, name: str) -> None:
    raise UnsupportedFormatError(
        name,
        f"VMDK createType {printable(ct)!r} is not supported "
        f"(read: {', '.join(t for t in L.CREATE_TYPES if readable_create_type(t))})",
    )
