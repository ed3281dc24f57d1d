"""QCOW2 (qemu's native format): the driver. The work is split as qemu splits it:

* ``_qcow2_layout``: on-disk structures (header, extensions, table entry bits, limits)
* ``_qcow2_plan``: the whole output layout, from the extent map alone
* ``_qcow2_writer``: the ordered emission of a planned layout (plain or compressed)
* ``_qcow2_pack``: compressed-mode packing and the compression spool
* ``_qcow2_reader``: the reader (tables, compressed clusters), bounded by the file's real size
* ``_qcow2_backing``: backing files, confined by hypersdk.references
* ``_qcow2_check``: the consistency check (metadata, and every allocated cluster read)
"""

from __future__ import annotations

from collections.abc import Mapping

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats import _qcow2_plan, _qcow2_writer
from hypersdk.formats._qcow2_layout import COMP as _COMP
from hypersdk.formats._qcow2_layout import STD as _STD
from hypersdk.formats._qcow2_pack import Packer as _Packer
from hypersdk.formats._qcow2_plan import DEFAULT_CLUSTER
from hypersdk.formats._qcow2_reader import Qcow2Image, UnsupportedQcow2
from hypersdk.formats._qcow2_writer import COMPRESS_LEVEL, Qcow2Layout
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import RangeReader, Sink

__all__ = [
    "COMPRESS_LEVEL",
    "DEFAULT_CLUSTER",
    "DRIVER",
    "Qcow2Driver",
    "Qcow2Image",
    "Qcow2Layout",
    "UnsupportedQcow2",
    "_COMP",
    "_STD",
    "_Packer",
]


class Qcow2Driver(FormatDriver):
    name = "qcow2"
    extensions = (".qcow2",)
    supports_backing = True
    option_names = ("cluster_size", "backing_file", "backing_format", "compat", "compression")
    probe_priority = 10

    def probe(self, head: bytes, size: int) -> bool:
        return head[:4] == L.MAGIC

    def open(self, reader: RangeReader) -> DiskImage:
        return Qcow2Image(reader)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Qcow2Layout:
        return _qcow2_plan.plan(size, extents, self.check_options(options))

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        if not isinstance(layout, Qcow2Layout):
            raise InvalidParameterError("qcow2 write needs a layout from qcow2 plan")
        _qcow2_writer.write(source, layout, out, progress)


DRIVER = Qcow2Driver()
