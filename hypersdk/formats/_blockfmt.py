"""Shared plumbing of the block-table formats (VHD, VDI, VHDX): one table maps fixed-size guest
blocks to places in the file, unallocated blocks read as zeros.

Why shared: the three writers emit "header, table, then each allocated block in guest order" and
the readers (Parallels too) resolve guest ranges through a block table the same way; only the
structures differ, and those live in each driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

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


# ------------------------------------------------------------------- reading a block table
# A header says how many entries a table has and where blocks lie; a hostile one says billions
# (a mostly-holes file reads as zeros, which often are valid entries). So a table is read a
# chunk at a time and only its allocated entries are kept, and those are bounded by the file:
# blocks may not overlap each other or the metadata, so no more than ``file size // block``
# of them fit. Memory and time follow the real file size, never a header field.
TABLE_CHUNK = 1 << 18  # entries read at a time (1-2 MiB)


def table_chunks(
    reader: RangeReader, offset: int, count: int, dtype: str, chunk: int = TABLE_CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """``count`` table entries of ``dtype`` at ``offset``, as (first index, entries) chunks."""
    size = np.dtype(dtype).itemsize
    for first in range(0, count, chunk):
        n = min(chunk, count - first)
        yield first, np.frombuffer(reader.read(offset + first * size, n * size), dtype=dtype)


class Allocation:
    """The allocated blocks of a block-table image, kept sparse: guest block indices
    (ascending) and the file offset of each block's data."""

    __slots__ = ("indices", "offsets", "block")

    def __init__(self, indices: np.ndarray, offsets: np.ndarray, block: int):
        self.indices = indices
        self.offsets = offsets
        self.block = block

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, index: int) -> int | None:
        """File offset of guest block ``index``, None if unallocated."""
        at = int(np.searchsorted(self.indices, index))
        if at < len(self.indices) and int(self.indices[at]) == index:
            return int(self.offsets[at])
        return None

    def extents(self, size: int) -> ExtentMap:
        """The guest ranges of the allocated blocks: one extent per run of adjacent blocks."""
        out = ExtentCollector(size)
        idx = self.indices
        if len(idx):
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            firsts = idx[np.concatenate(([0], breaks))].tolist()
            lasts = idx[np.concatenate((breaks - 1, [len(idx) - 1]))].tolist()
            for first, last in zip(firsts, lasts, strict=True):
                start = first * self.block
                if start < size:
                    out.add(start, min(size, (last + 1) * self.block) - start)
        return out.build()

    @classmethod
    def collect(
        cls,
        name: str,
        what: str,
        parts: Iterable[tuple[np.ndarray, np.ndarray]],
        *,
        block: int,
        span: int,
        file_size: int,
        reserved: Iterable[tuple[int, int, str]] = (),
        shift: int = 0,
    ) -> Allocation:
        """Gather (guest indices, file offsets of ``span`` bytes) chunks of allocated entries,
        refusing any that lie past the file end, overlap a ``reserved`` (start, end, label)
        range or another block. ``shift`` is added to each offset to reach the block's data
        (a VHD sector bitmap comes first)."""
        reserved = [(lo, hi, label) for lo, hi, label in reserved if hi > lo]
        limit = file_size // span if span > 0 else 0
        idx_parts: list[np.ndarray] = []
        off_parts: list[np.ndarray] = []
        total = 0
        for idx, off in parts:
            if not len(idx):
                continue
            off = off.astype(np.int64, copy=False)
            beyond = (off < 0) | (off > file_size - span)
            if beyond.any():
                at = int(np.argmax(beyond))
                raise FormatError(
                    name,
                    f"{what} entry for block {int(idx[at])} points beyond the end of the file "
                    f"({file_size} bytes): the image is truncated or corrupt",
                )
            for lo, hi, label in reserved:
                hit = (off < hi) & (off + span > lo)
                if hit.any():
                    at = int(np.argmax(hit))
                    raise FormatError(
                        name,
                        f"{what} entry for block {int(idx[at])} places it at {int(off[at])}, "
                        f"over the {label}: the image is corrupt",
                    )
            total += len(idx)
            if total > limit:
                raise FormatError(
                    name,
                    f"{what} maps more blocks than a file of {file_size} bytes can hold "
                    f"({limit} of {span} bytes): blocks share space, the image is corrupt",
                )
            idx_parts.append(idx.astype(np.int64, copy=False))
            off_parts.append(off)
        if not idx_parts:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty, block)
        indices = np.concatenate(idx_parts)
        offsets = np.concatenate(off_parts)
        order = np.argsort(offsets, kind="stable")
        ordered = offsets[order]
        clash = np.flatnonzero(ordered[1:] < ordered[:-1] + span)
        if clash.size:
            a, b = order[int(clash[0])], order[int(clash[0]) + 1]
            raise FormatError(
                name,
                f"{what} places blocks {int(indices[a])} and {int(indices[b])} in the same "
                f"file space (at {int(offsets[a])} and {int(offsets[b])}): the image is corrupt",
            )
        return cls(indices, offsets + shift, block)
