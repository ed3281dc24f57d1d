"""QCOW2 planning: the whole output layout from the extent map and the options, before any byte.

A guest cluster touched by a data extent is stored whole (read from the source); a cluster fully
covered by a ``zero`` extent becomes a v3 zero cluster; any other cluster stays unallocated, so
with a backing file it reads through to the base. A cluster only partly covered by a zero extent
(and by no data) is stored as data when there is a backing file: the source has the right bytes
for all of it.
"""

from __future__ import annotations

import numpy as np

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import _qcow2_layout as L
from hypersdk.formats._qcow2_layout import ceil_div as _ceil
from hypersdk.formats._qcow2_writer import DATA, ZERO, Qcow2Layout, Run, place

DEFAULT_CLUSTER = 64 * 1024


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1024 ** ("KMG".index(t[-1]) + 1)
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise InvalidParameterError(f"qcow2 cluster_size {text!r} is not a size") from None


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def cluster_runs(extents: ExtentMap, cs: int, size: int, v3: bool, backing: bool) -> list[Run]:
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    for e in extents:
        a, b = e.offset // cs, _ceil(e.end, cs)
        if not e.zero:
            data.append((a, b))
            continue
        fa = _ceil(e.offset, cs)
        fb = b if e.end == size else e.end // cs
        if v3 and fa < fb:
            zero.append((fa, fb))
        if backing:  # partly zeroed clusters: the source has the right bytes for all of them
            if fa >= fb:
                data.append((a, b))
            else:
                if a < fa:
                    data.append((a, fa))
                if fb < b:
                    data.append((fb, b))
    runs = [Run(a, b - a, DATA) for a, b in merge(data)]
    runs += [Run(a, b - a, ZERO) for a, b in merge(zero)]
    runs.sort(key=lambda r: r.first)
    rank = 0
    for r in runs:
        r.rank = rank
        if r.kind == DATA:
            rank += r.count
    return runs


def plan(size: int, extents: ExtentMap, opts: dict[str, str]) -> Qcow2Layout:
    """The layout of a qcow2 image of ``size`` bytes holding ``extents`` (options checked)."""
    cs = parse_size(opts.get("cluster_size", str(DEFAULT_CLUSTER)))
    if cs < 4096 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise InvalidParameterError(
            f"qcow2 cluster_size {cs} must be a power of two from 4 KiB to 2 MiB"
        )
    compat = opts.get("compat", "1.1").strip().lower()
    if compat in ("1.1", "v3", "3"):
        version = 3
    elif compat in ("0.10", "v2", "2"):
        version = 2
    else:
        raise InvalidParameterError(f"qcow2 compat {compat!r}: use 1.1 or 0.10")
    compression = opts.get("compression", "").strip().lower()
    if compression not in ("", "none", "zlib"):
        raise InvalidParameterError(f"qcow2 compression {compression!r}: only zlib")
    backing = opts.get("backing_file", "")
    backing_fmt = opts.get("backing_format", "")
    if len(backing.encode()) > L.MAX_BACKING_NAME:
        raise InvalidParameterError("qcow2 backing_file name is longer than 1023 bytes")
    if backing_fmt and not backing:
        raise InvalidParameterError("qcow2 backing_format needs a backing_file")
    if extents.size != size:
        raise InvalidParameterError(f"extent map covers {extents.size} bytes, disk {size}")
    if version == 2 and backing and extents.has_zero_extents:
        raise FormatError(
            None,
            "qcow2 compat 0.10 (v2) cannot store zero clusters, which this delta needs: "
            "use compat=1.1",
        )
    bits = cs.bit_length() - 1
    E = cs // 8
    vclusters = _ceil(size, cs)
    l1_size = _ceil(vclusters, E)
    if l1_size * 8 > L.MAX_L1_BYTES:
        raise InvalidParameterError(
            f"disk of {size} bytes is too large for qcow2 with {cs}-byte clusters"
        )
    runs = cluster_runs(extents, cs, size, version >= 3, bool(backing))
    if runs:
        idx = np.concatenate(
            [np.arange(r.first // E, (r.first + r.count - 1) // E + 1) for r in runs]
        )
        l2_indices = np.unique(idx).astype(np.int64)
    else:
        l2_indices = np.zeros(0, dtype=np.int64)
    data_clusters = sum(r.count for r in runs if r.kind == DATA)
    meta = place(cs, _ceil(l1_size * 8, cs), len(l2_indices), data_clusters)
    return Qcow2Layout(
        virtual_size=size,
        extents=extents,
        total_size=meta.total * cs,
        options=opts,
        cluster_bits=bits,
        version=version,
        backing_file=backing,
        backing_format=backing_fmt,
        compression=compression == "zlib",
        runs=runs,
        l2_indices=l2_indices,
        l1_size=l1_size,
        data_clusters=data_clusters,
        meta=meta,
    )
