"""RAW: the guest bytes as they are. Written sparse: zero blocks become holes on local files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from hypersdk.blockmap import nonzero_extents
from hypersdk.errors import FormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.formats.base import DiskImage, FormatDriver, Layout, Progress, Readable
from hypersdk.io import IO_CHUNK, FileRangeReader, RangeReader, Sink, read_pieces

SPARSE_BLOCK = 4096


class RawImage(DiskImage):
    format = "raw"

    def extents(self) -> ExtentMap:
        allocated = getattr(self.reader, "allocated", None)  # files, EBS snapshots
        if allocated is not None:
            return allocated()
        return ExtentMap.full(self.virtual_size)

    def iter_extents(self) -> Iterator[Extent]:
        if isinstance(self.reader, FileRangeReader):
            return self.reader.iter_allocated()
        return super().iter_extents()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        return self.reader.read(offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        length = len(view)
        if offset < 0 or offset + length > self.virtual_size:
            raise FormatError(
                self.name, f"read {offset}+{length} beyond disk end {self.virtual_size}"
            )
        readinto = getattr(self.reader, "readinto", None)
        if readinto is not None:
            readinto(offset, view)
        else:
            view[:] = self.reader.read(offset, length)

    def zero_heads(self, start: int, stop: int, step: int, width: int = 8) -> list[int]:
        """The reader's fast probe where it has one (local files): guest offsets are file offsets."""
        zero_heads = getattr(self.reader, "zero_heads", None)
        if zero_heads is None or stop > self.virtual_size:
            return super().zero_heads(start, stop, step, width)
        return zero_heads(start, stop, step, width)


class RawDriver(FormatDriver):
    name = "raw"
    extensions = (".raw", ".img")

    def probe(self, head: bytes, size: int) -> bool:
        return True  # anything is raw; the registry tries it last

    def open(self, reader: RangeReader) -> DiskImage:
        return RawImage(reader, reader.size)

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        self.check_options(options)
        if extents.has_zero_extents or extents.size != size:
            raise FormatError(None, "raw images cannot hold a delta; write a full export")
        return Layout(virtual_size=size, extents=extents, total_size=size)

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        write_sparse(source, layout.extents, layout.virtual_size, out, progress)


def write_sparse(
    source: Readable, data: ExtentMap, length: int, out: Sink, progress: Progress | None = None
) -> None:
    """``length`` bytes of ``source`` as they are, in order: the ``data`` extents, with every
    zero 4 KiB block in them and everything outside them written as zeros (holes on a local
    file). Raw images and VMDK flat extents are this."""
    pos = 0
    reads = _SparseReads(source)
    for piece, chunk in read_pieces(reads, data.split(IO_CHUNK)):
        out.write_zeros(piece.offset - pos)
        pos = piece.offset
        for ext in reads.runs.pop(piece.offset):
            out.write_zeros(ext.offset - pos)
            out.write(chunk[ext.offset - piece.offset : ext.end - piece.offset])
            pos = ext.end
        if progress:
            progress(piece.length)
    out.write_zeros(length - pos)


class _SparseReads:
    """Reads that also find their non-zero 4 KiB runs, on the reader thread: the writer's
    thread only writes, and zero blocks inside data still become holes."""

    def __init__(self, source: Readable):
        self._source = source
        self.size = source.size
        self.runs: dict[int, list[Extent]] = {}

    def readinto(self, offset: int, view: memoryview):
        readinto = getattr(self._source, "readinto", None)
        still_using = None
        if readinto is None:
            view[:] = self._source.read(offset, len(view))
        else:
            still_using = readinto(offset, view)
        self.runs[offset] = list(nonzero_extents(view, offset, SPARSE_BLOCK))
        return still_using


DRIVER = RawDriver()
