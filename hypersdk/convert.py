"""Format conversion: scan what a source holds, plan the output, stream it in one ordered pass."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from hypersdk.atomic import atomic_file, check_cache_mode
from hypersdk.blockmap import DEFAULT_BLOCK, is_zero, nonzero_extents
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats import get_driver, open_image
from hypersdk.formats.base import DiskImage, Layout, Progress, Readable, emit
from hypersdk.io import IO_CHUNK, FileRangeReader, Sink, read_pieces


def scan_data_extents(
    source: Readable,
    candidates: ExtentMap | None = None,
    block: int = DEFAULT_BLOCK,
    progress: Progress | None = None,
    probe: bool = False,
) -> ExtentMap:
    """Refine ``candidates`` (allocated ranges; default: the image's own) to the blocks that
    hold non-zero bytes.

    With ``probe`` (sources where a small read is cheap: local files), each block is settled by
    reading its first word, and only blocks that start with a zero word are read whole. Guest
    data almost never starts a 64 KiB block with eight zero bytes, so the scan reads ~1/8192 of
    the disk instead of all of it; the result is exact either way. Without ``candidates`` the
    probe streams the image's allocation (``DiskImage.iter_extents``), so a badly fragmented
    file is never held as a whole map.
    """
    if probe:
        stream = source.iter_extents() if candidates is None else iter(candidates)
        return _probe_scan(source, _aligned(stream, block, source.size), block, progress)
    if candidates is None:
        candidates = source.extents()
    found = ExtentCollector(candidates.size)
    chunk = IO_CHUNK // block * block
    pieces = candidates.aligned(block).split(chunk)
    for piece, data in read_pieces(source, pieces, chunk=chunk, threads=2):
        found.extend(nonzero_extents(data, piece.offset, block))
        if progress:
            progress(piece.length)
    return found.build()


def _aligned(extents: Iterable[Extent], block: int, size: int) -> Iterator[Extent]:
    """Ascending extents widened to ``block`` boundaries (clipped to ``size``), without overlaps."""
    covered = 0
    for e in extents:
        start = max(covered, e.offset // block * block)
        end = min(size, -(-e.end // block) * block)
        if end > start:
            yield Extent(start, end - start)
            covered = end


_PROBE_WINDOW = 4096  # blocks probed per call


def _probe_scan(
    source: DiskImage, candidates: Iterable[Extent], block: int, progress: Progress | None
) -> ExtentMap:
    """Every block of ``candidates`` is data except those whose head reads as zeros and whose
    whole content is zeros; only those few are read whole."""
    found = ExtentCollector(source.size)
    read = source.read
    window = _PROBE_WINDOW * block  # bounds the list of candidates on a disk full of zeros
    for ext in candidates:
        pos = ext.offset  # start of the data not yet recorded
        for start in range(ext.offset, ext.end, window):
            stop = min(ext.end, start + window)
            for off in source.zero_heads(start, stop, block):
                length = min(block, stop - off)
                if is_zero(read(off, length)):
                    found.add(pos, off - pos)
                    pos = off + length
            if progress:
                progress(stop - start)
        found.add(pos, ext.end - pos)
    return found.build()


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
    emit(driver, source, layout, out, progress)
    return layout


def convert_image(
    image: DiskImage,
    dst: str | os.PathLike,
    fmt: str,
    options: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    scan_progress: Progress | None = None,
    cache: str = "writeback",
    before_publish: Callable[[], None] | None = None,
) -> ConvertResult:
    """Convert an opened image to a local file, atomically (temp name, fsync, rename).

    ``cache`` is the output's cache mode (hypersdk.atomic: writeback, none, unsafe).
    ``before_publish`` runs once every byte is written, before the output takes its name: if
    it raises, nothing is published (a check that ran beside the conversion)."""
    started = time.perf_counter()
    check_cache_mode(cache)
    dst = os.fspath(dst)
    local = isinstance(getattr(image, "reader", None), FileRangeReader)
    extents = scan_data_extents(image, progress=scan_progress, probe=local)
    driver = get_driver(fmt)
    layout = driver.plan(image.size, extents, options or {})
    layout.bind_output(dst)  # side files that must name the main output (VMDK flat)
    with atomic_file(dst, cache) as sink:
        emit(driver, image, layout, sink, progress)
        size = sink.tell()
        if before_publish is not None:
            before_publish()
    extra = []
    for suffix, data in layout.extra_files.items():
        side = (
            dst + suffix if suffix.startswith(".") else os.path.join(os.path.dirname(dst), suffix)
        )
        with atomic_file(side, cache) as s:
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
    cache: str = "writeback",
) -> ConvertResult:
    with open_image(src, src_fmt) as image:
        return convert_image(image, dst, fmt, options, progress, scan_progress, cache)
