"""VMDK planning: the output layout from the extent map and the options, before any byte."""

from __future__ import annotations

import os

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _vmdk_layout as L
from hypersdk.formats._vmdk_layout import ceil_div as _ceil
from hypersdk.formats._vmdk_sparse import MAX_CAPACITY
from hypersdk.formats._vmdk_writer import (
    COMPRESS_LEVEL,
    GRAIN,
    SECTOR,
    VmdkLayout,
    grain_runs,
    sparse_geometry,
    stream_overhead,
)


def plan(size: int, extents: ExtentMap, opts: dict[str, str]) -> VmdkLayout:
    """The layout of a VMDK of ``size`` bytes holding ``extents`` (option names checked)."""
    sub = opts.get("subformat", "monolithicSparse")
    match = {s.lower(): s for s in L.SUBFORMATS}.get(sub.lower())
    if match is None:
        raise InvalidParameterError(
            f"vmdk subformat {sub!r} cannot be written (choose {', '.join(L.SUBFORMATS)})"
        )
    adapter = opts.get("adapter_type", "lsilogic")
    if adapter not in L.ADAPTERS:
        raise InvalidParameterError(
            f"vmdk adapter_type {adapter!r} unknown (choose {', '.join(L.ADAPTERS)})"
        )
    try:
        hw = int(opts.get("hwversion", "4"))
        level = int(opts.get("compression_level", str(COMPRESS_LEVEL)))
    except ValueError:
        raise InvalidParameterError("vmdk hwversion and compression_level are integers") from None
    if not 3 <= hw <= 21:
        raise InvalidParameterError(f"vmdk hwversion {hw} is out of range (3..21)")
    if not 1 <= level <= 9:
        raise InvalidParameterError(f"vmdk compression_level {level} is out of range (1..9)")
    if extents.size != size:
        raise FormatError(None, "extent map size differs from the disk size")
    if size > MAX_CAPACITY:
        raise InvalidParameterError(f"disk of {size} bytes is too big for VMDK")
    cap = _ceil(size, SECTOR)
    runs = grain_runs(extents)
    data_grains = sum(c for _, c, _ in runs)
    gt_count = _ceil(cap, L.DEFAULT_GRAIN_SECTORS * L.GTES_PER_GT)
    cid = int.from_bytes(os.urandom(4), "little") | 1
    lo = VmdkLayout(
        virtual_size=size,
        extents=extents,
        total_size=0,
        options=opts,
        subformat=match,
        adapter_type=adapter,
        hwversion=hw,
        compression_level=level,
        cid=cid,
        capacity_sectors=cap,
        runs=runs,
        data_grains=data_grains,
        gt_count=gt_count,
    )
    if match == "monolithicSparse":
        lo.total_size = sparse_geometry(lo)["total"] * SECTOR
    elif match == "monolithicFlat":
        lo.total_size = cap * SECTOR
        lo.not_streamable = (
            "vmdk subformat=monolithicFlat is a flat extent plus a descriptor file that names "
            "it, which one export object cannot carry: export subformat=monolithicSparse or "
            "streamOptimized, or make a flat VMDK locally with `hyperctl convert`"
        )
    else:
        # upper bound: every grain stored (deflate can grow ~0.03% + marker), every table
        gd_sectors = _ceil(gt_count * 4, SECTOR)
        per_grain = _ceil(12 + GRAIN + GRAIN // 1000 + 64, SECTOR)
        lo.total_size = SECTOR * (
            stream_overhead(lo) + data_grains * per_grain + gt_count * (1 + 4) + 1 + gd_sectors + 3
        )
        lo.size_exact = False
    return lo
