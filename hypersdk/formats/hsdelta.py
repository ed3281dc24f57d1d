"""HSDELTA: the backup repository's delta format (docs/repository.md, "HSDELTA v1").

A delta stores only the changed extents of an incremental (data and zeroed ranges) plus an
index, and names its parent by export id, disk name and the parent object's BLAKE3, never by
path: chains then work on every target, encrypted or not, through ranged reads. The work is
split in three:

* ``_hsdelta_layout``: the header and index structures, and their validation
* ``_hsdelta_reader``: ``DeltaLayer``, one layer of a chain (reads, extents, info, check)
* here: the driver, the plan (exact size before any byte) and the streaming writer

A delta is not a disk on its own, so its kind is "delta": it is not one of the formats a user
converts or exports to (the repository writes it for incrementals).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

import blake3
import numpy as np

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _hsdelta_layout as L
from hypersdk.formats._hsdelta_reader import DeltaLayer
from hypersdk.formats.base import FormatDriver, Layout, Progress, Readable
from hypersdk.io import IO_CHUNK, RangeReader, Sink, read_pieces
from hypersdk.names import check_export_id

__all__ = ["DRIVER", "DeltaLayer", "HsDeltaDriver", "HsDeltaLayout", "PARENT_OPTIONS"]

PARENT_OPTIONS = (
    "parent_export_id",
    "parent_disk",
    "parent_object_blake3",
    "parent_virtual_size",
)


@dataclass
class HsDeltaLayout(Layout):
    """A planned delta: its header and index bytes are final before the first write."""

    header: L.DeltaHeader | None = None
    header_bytes: bytes = b""
    index_bytes: bytes = b""


class HsDeltaDriver(FormatDriver):
    name = "hsdelta"
    extensions = (".hsdelta",)
    kind = "delta"
    supports_backing = True
    option_names = PARENT_OPTIONS
    probe_priority = 10

    def probe(self, head: bytes, size: int) -> bool:
        return head[: len(L.MAGIC)] == L.MAGIC

    def open(self, reader: RangeReader) -> DeltaLayer:
        return DeltaLayer(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> HsDeltaLayout:
        opts = self.check_options(options)
        parent = _parent(opts)
        if not 0 <= size <= L.MAX_SIZE:
            raise InvalidParameterError(f"hsdelta: disk size {size} is out of range")
        if extents.size != size:
            raise InvalidParameterError(f"extent map covers {extents.size} bytes, disk {size}")
        if len(extents) > L.MAX_ENTRIES:
            raise InvalidParameterError(
                f"hsdelta holds at most {L.MAX_ENTRIES} extents, the map has {len(extents)}"
            )
        count = len(extents)
        offsets = np.fromiter((e.offset for e in extents), dtype=np.uint64, count=count)
        lengths = np.fromiter((e.length for e in extents), dtype=np.uint64, count=count)
        kinds = np.fromiter(
            (L.ZERO if e.zero else L.DATA for e in extents), dtype=np.uint8, count=count
        )
        index = L.pack_index(offsets, lengths, kinds)
        header = L.DeltaHeader(
            virtual_size=size,
            extent_count=count,
            data_offset=L.data_offset_for(count),
            data_size=extents.data_bytes,
            index_blake3=blake3.blake3(index).digest(),
            **parent,
        )
        return HsDeltaLayout(
            virtual_size=size,
            extents=extents,
            total_size=header.object_size,
            options=opts,
            header=header,
            header_bytes=header.pack(),
            index_bytes=index,
        )

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        """Header, index, padding, then each data extent's bytes in index order, read from
        ``source`` in large pieces: strictly in order, never seeking."""
        if not isinstance(layout, HsDeltaLayout) or layout.header is None:
            raise InvalidParameterError("hsdelta write needs a layout from hsdelta plan")
        if source.size < layout.virtual_size:
            raise InvalidParameterError(
                f"source of {source.size} bytes is smaller than the delta's disk "
                f"({layout.virtual_size})"
            )
        start = out.tell()
        out.write(layout.header_bytes)
        out.write(layout.index_bytes)
        out.write_zeros(layout.header.data_offset - L.INDEX_OFFSET - len(layout.index_bytes))
        pieces = (e for e in layout.extents.split(IO_CHUNK) if not e.zero)
        for piece, view in read_pieces(source, pieces):
            if len(view) != piece.length:
                raise FormatError(
                    getattr(source, "name", None),
                    f"read {piece.offset}+{piece.length} gave {len(view)} bytes",
                )
            out.write(view)
            if progress:
                progress(piece.length)
        written = out.tell() - start
        if written != layout.total_size:  # a bug of ours, never a silent bad object
            raise FormatError(None, f"hsdelta wrote {written} bytes, planned {layout.total_size}")


def _parent(opts: Mapping[str, str]) -> dict:
    """The parent's identity from the options, each validated: every delta names its parent."""
    missing = [n for n in PARENT_OPTIONS if not opts.get(n)]
    if missing:
        raise InvalidParameterError(
            f"hsdelta needs option {', '.join(missing)}: a delta names its parent "
            "(export id, disk, the parent object's BLAKE3 and virtual size)"
        )
    export_id = check_export_id(opts["parent_export_id"], "hsdelta parent_export_id")
    disk = opts["parent_disk"]
    try:
        disk_len = len(disk.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidParameterError("hsdelta parent_disk is not valid UTF-8 text") from None
    if disk_len > L.MAX_DISK:
        raise InvalidParameterError(
            f"hsdelta parent_disk is {disk_len} bytes of UTF-8, at most {L.MAX_DISK}"
        )
    digest = opts["parent_object_blake3"].strip().lower()
    if len(digest) != 64 or not set(digest) <= set(string.hexdigits.lower()):
        raise InvalidParameterError(
            "hsdelta parent_object_blake3 must be 64 hex digits (a BLAKE3 digest)"
        )
    text = opts["parent_virtual_size"].strip()
    if not (text.isascii() and text.isdigit()) or int(text) > L.MAX_SIZE:
        raise InvalidParameterError(
            f"hsdelta parent_virtual_size {text[:40]!r} must be a byte count (0 to 2**63-1)"
        )
    return {
        "parent_export_id": export_id,
        "parent_disk": disk,
        "parent_object_blake3": bytes.fromhex(digest),
        "parent_virtual_size": int(text),
    }


DRIVER = HsDeltaDriver()
