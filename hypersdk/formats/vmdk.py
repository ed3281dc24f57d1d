"""VMDK (VMware's disk format): the driver. The work is split by job:

* ``_vmdk_layout``: on-disk structures (sparse header, markers, createTypes)
* ``_vmdk_descriptor``: the text descriptor (parse, build)
* ``_vmdk_sparse``: one hosted sparse extent (monolithicSparse, streamOptimized, split parts)
* ``_sesparse``: one ESXi seSparse extent (a VMFS-6 snapshot's data file)
* ``_vmdk_extents``: what each extent line becomes (one table entry per kind), extent files
  confined by hypersdk.references
* ``_vmdk_parent``: a delta's parent disk (parentFileNameHint, parentCID), confined likewise
* ``_vmdk_reader``: the image: a sparse file, or a descriptor and the extents it names, over
  its parent if it has one
* ``_vmdk_plan``: the output layout, from the extent map alone
* ``_vmdk_writer``: the ordered emission (monolithicSparse, streamOptimized, monolithicFlat)

Read: monolithicSparse, streamOptimized (footer at EOF-1024 when the header says GD_AT_END),
monolithicFlat / twoGbMaxExtentFlat / vmfs (a text descriptor naming flat extents),
twoGbMaxExtentSparse (a descriptor naming several sparse extents) and seSparse (ESXi
snapshots), each of them a delta over a parent VMDK when its descriptor names one (chains of up
to 16 disks, the parent's CID checked). The other kinds (vmfsSparse and COWD extents, raw
devices, custom) are refused by name, and so is a bare seSparse extent file. Write: option
``subformat``.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats import _vmdk_plan, _vmdk_writer
from hypersdk.formats._vmdk_descriptor import (
    Descriptor,
    ExtentLine,
    build_descriptor,
    descriptor_text,
    parse_descriptor,
)
from hypersdk.formats._vmdk_reader import Opener, VmdkImage, open_vmdk
from hypersdk.formats._vmdk_sparse import SparseExtent
from hypersdk.formats._vmdk_writer import VmdkLayout
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import RangeReader, Sink

__all__ = [
    "DRIVER",
    "Descriptor",
    "ExtentLine",
    "SparseExtent",
    "VmdkDriver",
    "VmdkImage",
    "VmdkLayout",
    "build_descriptor",
    "descriptor_text",
    "open_vmdk",
    "parse_descriptor",
]


class VmdkDriver(FormatDriver):
    name = "vmdk"
    extensions = (".vmdk",)
    option_names = ("subformat", "adapter_type", "hwversion", "compression_level")
    probe_priority = 5

    def probe(self, head: bytes, size: int) -> bool:
        if head[:4] in (L.MAGIC_BYTES, L.COWD_MAGIC):  # COWD: recognised, then refused by name
            return True
        text = head[:1024]
        return text.startswith(b"# Disk DescriptorFile") or (
            b"createType=" in text and descriptor_text(text) is not None
        )

    def open(self, reader: RangeReader, opener: Opener | None = None) -> DiskImage:
        return open_vmdk(reader, opener)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> VmdkLayout:
        return _vmdk_plan.plan(size, extents, self.check_options(options))

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        if not isinstance(layout, VmdkLayout):
            raise InvalidParameterError("vmdk write needs a layout from vmdk plan")
        _vmdk_writer.write(source, layout, out, progress)


DRIVER = VmdkDriver()
