"""VMDK extents: what each extent line of a descriptor becomes, one table entry per kind.

``KINDS`` maps an extent kind (the third word of an extent line) to a function
``(line, files, length) -> VmdkExtent`` (``length``, ``read``, ``iter_extents``, ``check``); a
new kind of extent is one entry there, and the createTypes made of it
(``_vmdk_layout.CREATE_TYPES``) become readable with it. Kinds we recognise but do not read are
refused by name (``UNREAD``), never read as something else.

Extents that can belong to a delta disk (SPARSE, SESPARSE) have ``delta = True``: their
unallocated grains read through ``set_parent``'s function and ``layer_extents`` tells which
ranges they define themselves (data, or zeros that hide the parent). FLAT and ZERO extents
define every byte of their range.

Extent files are named by the descriptor, so they are hostile: ``ExtentFiles`` resolves every
name through ``hypersdk.references`` (the descriptor's own directory unless the policy says
more), opens each file once, and refuses a file that backs the same bytes twice (two flat
extents over one range, a sparse file used twice): the guest disk can then never be larger than
the files that hold it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol

from hypersdk.errors import FormatError, HyperSDKError, UnsupportedFormatError
from hypersdk.extents import Extent
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._sesparse import SeSparseExtent, is_sesparse
from hypersdk.formats._vmdk_descriptor import ExtentLine
from hypersdk.formats._vmdk_sparse import ParentRead, SparseExtent
from hypersdk.io import FileRangeReader, RangeReader
from hypersdk.references import printable, require_regular, resolve_reference

SECTOR = L.SECTOR
WHAT = "extent file"

Opener = Callable[[str], RangeReader]


class VmdkExtent(Protocol):
    """``length`` guest bytes of the disk, whatever holds them."""

    length: int
    delta: bool  # may read through to a parent (then it has set_parent and layer_extents)

    def read(self, offset: int, length: int) -> bytes: ...

    def iter_extents(self, base: int) -> Iterator[Extent]:
        """Guest ranges that may hold data, offset by ``base``, in order."""
        ...

    def check(self) -> list[str]: ...


class DeltaExtent(VmdkExtent, Protocol):
    """An extent whose unallocated grains show its parent's bytes."""

    def set_parent(self, read: ParentRead | None) -> None:
        """Read unallocated grains with ``read(offset, length)`` (extent-relative)."""
        ...

    def layer_extents(self, base: int) -> Iterator[Extent]:
        """Its own grains, offset by ``base``, in order: data, and zero extents that hide the
        parent; the parent shows through everywhere else."""
        ...


class ExtentFiles:
    """The files a descriptor names: resolved, confined, each opened once, each byte used once.

    ``opener`` (an OVA's member lookup) replaces the file system when given."""

    def __init__(self, descriptor: RangeReader, opener: Opener | None = None):
        self.name = descriptor.name
        self.referrer = descriptor.name if isinstance(descriptor, FileRangeReader) else None
        self.opener = opener
        self.readers: dict[str, RangeReader] = {}
        self._resolved: dict[str, str] = {}  # name in the descriptor -> real path
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # file -> byte ranges used
        self._whole: set[str] = set()  # files a sparse extent uses entirely

    def open(self, filename: str) -> tuple[str, RangeReader]:
        """(key, reader) of an extent file named by the descriptor."""
        name = filename.replace("\\", "/")
        if self.opener is not None:
            key = name
            if key not in self.readers:
                self.readers[key] = self.opener(name)
            return key, self.readers[key]
        key = self._resolved.get(name)
        if key is None:
            try:
                key = self._resolved[name] = resolve_reference(self.referrer, name, WHAT)
            except FormatError as exc:
                raise FormatError(self.name, exc.problem) from None
        if key not in self.readers:
            try:
                require_regular(key, WHAT)
                self.readers[key] = FileRangeReader(key)
            except FormatError as exc:
                raise FormatError(self.name, f"{exc.problem}: {printable(key)}") from None
            except HyperSDKError as exc:
                raise FormatError(self.name, f"{WHAT} {printable(name)!r}: {exc}") from None
        return key, self.readers[key]

    def use(self, key: str, start: int, length: int) -> None:
        """Claim bytes [start, start+length) of file ``key`` for one extent."""
        if key in self._whole:
            self._twice(key)
        self._ranges.setdefault(key, []).append((start, start + length))

    def use_whole(self, key: str) -> None:
        if key in self._whole or key in self._ranges:
            self._twice(key)
        self._whole.add(key)

    def _twice(self, key: str) -> None:
        raise FormatError(
            self.name,
            f"{WHAT} {printable(os.path.basename(key))!r} backs the same bytes of the disk twice "
            "(corrupt or hostile descriptor)",
        )

    def finish(self) -> None:
        """Refuse overlapping uses of one file, once every extent line is read."""
        for key, ranges in self._ranges.items():
            ranges.sort()
            for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
                if start < end:
                    self._twice(key)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers = {}


# ------------------------------------------------------------------------------------ kinds
class ZeroExtent:
    """A ZERO extent: reads as zeros, holds nothing."""

    delta = False

    def __init__(self, length: int):
        self.length = length

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def iter_extents(self, base: int) -> Iterator[Extent]:
        return iter(())

    def check(self) -> list[str]:
        return []


class FlatExtent:
    """A FLAT (or VMFS) extent: ``length`` bytes of a file from ``file_offset``."""

    delta = False

    def __init__(self, reader: RangeReader, file_offset: int, length: int):
        self.reader = reader
        self.file_offset = file_offset
        self.length = length

    def read(self, offset: int, length: int) -> bytes:
        return self.reader.read(self.file_offset + offset, length)

    def iter_extents(self, base: int) -> Iterator[Extent]:
        if not isinstance(self.reader, FileRangeReader):  # an OVA member: no holes known
            yield Extent(base, self.length)
            return
        lo, hi = self.file_offset, self.file_offset + self.length
        for e in self.reader.iter_allocated():  # the file's own holes are the disk's
            if e.end <= lo:
                continue
            if e.offset >= hi:
                break
            a, b = max(lo, e.offset), min(hi, e.end)
            yield Extent(base + a - lo, b - a)

    def check(self) -> list[str]:
        return []  # raw bytes: nothing in them can be malformed


class SparsePart:
    """A SPARSE extent: the first ``length`` bytes of a hosted sparse file."""

    delta = True

    def __init__(self, sparse: SparseExtent, length: int):
        self.sparse = sparse
        self.length = length

    def read(self, offset: int, length: int) -> bytes:
        return self.sparse.read(offset, length)

    def iter_extents(self, base: int) -> Iterator[Extent]:
        return _clip(self.sparse.data_extents(base), base + self.length)

    def layer_extents(self, base: int) -> Iterator[Extent]:
        return _clip(self.sparse.layer_extents(base), base + self.length)

    def set_parent(self, read: ParentRead | None) -> None:
        self.sparse.parent_read = read

    def check(self) -> list[str]:
        return self.sparse.check()


class SeSparsePart:
    """A SESPARSE extent (an ESXi snapshot's data file, ``_sesparse``): 4 KiB grains, zero and
    unmapped grains read as zeros, unallocated ones through to the parent."""

    delta = True

    def __init__(self, extent: SeSparseExtent):
        self.sesparse = extent
        self.length = extent.capacity

    def read(self, offset: int, length: int) -> bytes:
        return self.sesparse.read(offset, length)

    def iter_extents(self, base: int) -> Iterator[Extent]:
        return (e for e in self.sesparse.iter_extents(base) if not e.zero)

    def layer_extents(self, base: int) -> Iterator[Extent]:
        return self.sesparse.iter_extents(base)

    def set_parent(self, read: ParentRead | None) -> None:
        self.sesparse.parent_read = read

    def check(self) -> list[str]:
        return self.sesparse.check()


def _clip(extents: Iterator[Extent], end: int) -> Iterator[Extent]:
    for e in extents:
        if e.offset >= end:
            break
        yield Extent(e.offset, min(e.end, end) - e.offset, e.zero)


def _zero(line: ExtentLine, files: ExtentFiles, length: int) -> VmdkExtent:
    return ZeroExtent(length)


def _flat(line: ExtentLine, files: ExtentFiles, length: int) -> VmdkExtent:
    key, reader = files.open(_filename(line, files))
    start = line.offset * SECTOR
    if reader.size < start + length:
        raise FormatError(
            printable(reader.name),
            f"flat extent is {reader.size} bytes, descriptor needs {start + length}: truncated",
        )
    files.use(key, start, length)
    return FlatExtent(reader, start, length)


def _sparse(line: ExtentLine, files: ExtentFiles, length: int) -> VmdkExtent:
    key, reader = files.open(_filename(line, files))
    files.use_whole(key)
    sp = SparseExtent(reader, printable(reader.name))  # the name comes from the descriptor
    if sp.capacity < length:
        raise FormatError(
            sp.name, f"sparse extent holds {sp.capacity} bytes, descriptor says {length}"
        )
    return SparsePart(sp, length)


def _sesparse(line: ExtentLine, files: ExtentFiles, length: int) -> VmdkExtent:
    key, reader = files.open(_filename(line, files))
    files.use_whole(key)
    name = printable(reader.name)  # the name comes from the descriptor
    if not is_sesparse(reader.read(0, min(8, reader.size))):
        raise FormatError(name, "SESPARSE extent file has no seSparse magic (0xcafebabe)")
    return SeSparsePart(SeSparseExtent(reader, capacity_sectors=line.sectors, name=name))


def _filename(line: ExtentLine, files: ExtentFiles) -> str:
    if not line.filename:
        raise FormatError(files.name, f"{line.kind} extent without a file name")
    return line.filename


KINDS: dict[str, Callable[[ExtentLine, ExtentFiles, int], VmdkExtent]] = {
    "FLAT": _flat,
    "VMFS": _flat,
    "ZERO": _zero,
    "SPARSE": _sparse,
    "SESPARSE": _sesparse,
}

UNREAD: dict[str, str] = {  # kinds we recognise but do not read
    "VMFSSPARSE": "VMFS sparse (COWD redo-log) extents",
    "VMFSRDM": "raw device mappings",
    "VMFSRAW": "raw device extents",
}


def open_extent(line: ExtentLine, files: ExtentFiles, length: int) -> VmdkExtent:
    """The extent an extent line describes; UnsupportedFormatError naming a kind we do not read."""
    make = KINDS.get(line.kind)
    if make is None:
        what = UNREAD.get(line.kind, "extents of that type")
        raise UnsupportedFormatError(
            files.name,
            f"VMDK extent type {printable(line.kind)} is not supported ({what} are not read)",
        )
    return make(line, files, length)


def readable_create_type(create_type: str) -> bool:
    """A createType is read when the kind of extent it is made of is."""
    return L.CREATE_TYPES.get(create_type) in KINDS
