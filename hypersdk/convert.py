"""Format conversion: scan what a source holds, plan the output, stream it in one ordered pass."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from hypersdk.atomic import atomic_file
from hypersdk.blockmap import DEFAULT_BLOCK, nonzero_extents
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver, open_image
from hypersdk.formats.base import DiskImage, Layout, Progress, Readable
from hypersdk.io import IO_CHUNK, Sink, read_ahead


def scan_data_extents(
    source: Readable,
    candidates: ExtentMap,
    block: int = DEFAULT_BLOCK,
    progress: Progress | None = None,
) -> ExtentMap:
    """Refine ``candidates`` (allocated ranges) to the blocks that hold non-zero bytes."""
    found = []
    chunk = IO_CHUNK // block * block
    for piece, data in read_ahead(source, candidates.aligned(block).split(chunk)):
        found.extend(nonzero_extents(data, piece.offset, block))
        if progress:
            progress(piece.length)
    return ExtentMap(candidates.size, found)


@dataclass
class ConvertResult:
    path: str
    format: str
    virtual_size: int
    data_bytes: int
    output_bytes: int
    seconds: float
    extra_files: list[str]


def convert_stream(
    source: Readable,
    fmt: str,
    out: Sink,
    extents: ExtentMap,
    options: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Layout:
    """Plan ``fmt`` for ``extents`` of ``source`` and emit it into ``out``."""
    driver = get_driver(fmt)
    layout = driver.plan(source.size, extents, options or {})
    driver.write(source, layout, out, progress)
    return layout


def convert_image(
    image: DiskImage,
    dst: str | os.PathLike,
    fmt: str,
    options: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    scan_progress: Progress | None = None,
) -> ConvertResult:
    """Convert an opened image to a local file, atomically (temp name, fsync, rename)."""
    started = time.perf_counter()
    dst = os.fspath(dst)
    extents = scan_data_extents(image, image.extents(), progress=scan_progress)
    driver = get_driver(fmt)
    layout = driver.plan(image.size, extents, options or {})
    bind = getattr(layout, "bind_output", None)
    if bind is not None:  # side files that must name the main output (VMDK flat descriptor)
        bind(dst)
    with atomic_file(dst) as sink:
        driver.write(image, layout, sink, progress)
        size = sink.tell()
    extra = []
    for suffix, data in layout.extra_files.items():
        side = (
            dst + suffix if suffix.startswith(".") else os.path.join(os.path.dirname(dst), suffix)
        )
        with atomic_file(side) as s:
            s.write(data)
        extra.append(side)
    return ConvertResult(
        dst, fmt, image.virtual_size, extents.data_bytes, size, time.perf_counter() - started, extra
    )


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str,
    src_fmt: str | None = None,
    options: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    scan_progress: Progress | None = None,
) -> ConvertResult:
    with open_image(src, src_fmt) as image:
        return convert_image(image, dst, fmt, options, progress, scan_progress)
