"""Shared plumbing of the block-table formats (VHD, VDI, VHDX): one table maps fixed-size guest
blocks to places in the file, unallocated blocks read as zeros.

Why shared: the three writers emit "header, table, then each allocated block in guest order" and
the three readers resolve guest ranges through a block table the same way; only the structures
differ, and those live in each driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.extents import Extent, ExtentCollector, ExtentMap
from hypersdk.formats.base import Progress, Readable
from hypersdk.io import IO_CHUNK, RangeReader, Sink, read_pieces

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(name: str, text: str) -> int:
    """'2M', '65536', '1G' -> bytes (binary units, like qemu-img)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise InvalidParameterError(f"option {name}={text!r} is not a size (e.g. 1M)") from None
    if value <= 0:
        raise InvalidParameterError(f"option {name}={text!r} must be positive")
    return value


def parse_bool(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "on", "true", "yes"):
        return True
    if t in ("0", "off", "false", "no"):
        return False
    raise InvalidParameterError(f"option {name}={text!r} must be on/off")


def choice(options: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = options.get(name, default).strip().lower()
    if value not in allowed:
        raise InvalidParameterError(f"option {name}={value!r} is not one of {', '.join(allowed)}")
    return value


def refuse_delta(fmt: str, extents: ExtentMap, size: int) -> None:
    if extents.has_zero_extents or extents.size > size:
        raise FormatError(
            None,
            f"{fmt} images are written as full images here and cannot hold a delta "
            "(zeroed ranges); write a full export or use qcow2 for incrementals",
        )


def used_blocks(extents: ExtentMap, block: int) -> list[int]:
    """Indices of the blocks touched by a data extent, ascending."""
    out: list[int] = []
    for e in extents.data():
        first = e.offset // block
        last = (e.end - 1) // block
        start = first if not out or out[-1] < first else out[-1] + 1
        out.extend(range(start, last + 1))
    return out


def _pieces(extents: ExtentMap) -> Iterator[Extent]:
    return (p for p in extents.split(IO_CHUNK) if not p.zero)


def emit_flat(
    source: Readable, extents: ExtentMap, out: Sink, length: int, progress: Progress | None
) -> None:
    """``length`` guest bytes as they are: data from extents, holes elsewhere (fixed images)."""
    pos = 0
    for piece, data in read_pieces(source, _pieces(extents)):
        out.write_zeros(piece.offset - pos)
        out.write(data)
        pos = piece.end
        if progress:
            progress(piece.length)
    out.write_zeros(length - pos)


def emit_blocks(
    source: Readable,
    extents: ExtentMap,
    block: int,
    out: Sink,
    progress: Progress | None,
    prefix: Callable[[int], None] | None = None,
) -> None:
    """Each used block in guest order as ``block`` bytes (``prefix(index)`` may emit a per-block
    header such as a VHD sector bitmap first). Gaps inside a block are written as zeros."""
    current = -1
    pos = 0
    # read in large pieces (blocks are powers of two, so a piece never straddles a block unless
    # the block is smaller than the piece) and cut them at block boundaries here
    for piece, data in read_pieces(source, _pieces(extents)):
        view = data
        at = piece.offset
        while at < piece.end:
            index = at // block
            stop = min(piece.end, (index + 1) * block)
            if index != current:
                if current >= 0:
                    out.write_zeros(block - pos)
                if prefix:
                    prefix(index)
                current, pos = index, 0
            rel = at - index * block
            out.write_zeros(rel - pos)
            out.write(view[at - piece.offset : stop - piece.offset])
            pos = rel + stop - at
            at = stop
        if progress:
            progress(piece.length)
    if current >= 0:
        out.write_zeros(block - pos)


def read_mapped(
    reader: RangeReader,
    offset: int,
    length: int,
    block: int,
    locate: Callable[[int], int | None],
) -> bytes:
    """Guest bytes through a block table: ``locate(index)`` gives a block's file offset or None
    (reads as zeros). Runs of blocks that sit back to back in the file are read in one go."""
    parts: list[bytes] = []
    pos, end = offset, offset + length
    run_file, run_len = -1, 0
    while pos < end:
        index = pos // block
        within = pos - index * block
        n = min(block - within, end - pos)
        where = locate(index)
        if where is not None and run_len and run_file + run_len == where + within:
            run_len += n
        else:
            if run_len:
                parts.append(reader.read(run_file, run_len))
                run_len = 0
            if where is None:
                parts.append(bytes(n))
            else:
                run_file, run_len = where + within, n
        pos += n
    if run_len:
        parts.append(reader.read(run_file, run_len))
    return b"".join(parts)


def check_range(name: str, what: str, offset: int, length: int, file_size: int) -> None:
    """Refuse a structure that a header places outside the file (before reading/allocating)."""
    if offset < 0 or length < 0 or offset + length > file_size:
        raise FormatError(
            name,
            f"{what} at {offset}+{length} lies beyond the end of the file ({file_size} bytes): "
            "the image is truncated or corrupt",
        )


def check_read(name: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise FormatError(name, f"read {offset}+{length} beyond disk end {size}")


def block_extents(blocks: Iterable[int], block: int, size: int) -> ExtentMap:
    """The guest ranges of the used ``blocks`` (ascending indices)."""
    out = ExtentCollector(size)
    for b in blocks:
        if b * block < size:
            out.add(b * block, min(size, (b + 1) * block) - b * block)
    return out.build()
