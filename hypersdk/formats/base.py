"""The one contract every disk-format driver fills (like a qemu BlockDriver table).

Read side: ``FormatDriver.open(reader)`` gives a ``DiskImage``: virtual size, the extents that may
hold data, and random reads of the guest-visible bytes.

Write side: ``plan(size, extents, options)`` decides the whole layout up front (headers, tables,
where each data cluster goes) from the extent map alone, then ``write(source, layout, sink)``
emits the bytes strictly in order into a ``Sink`` (never seeking), so the output can stream into
an encryptor or a multipart upload. ``source`` is anything with ``read(offset, length)`` over the
guest-visible bytes, normally a DiskImage or a source disk reader.

The generic layer (convert, flows) never knows a format's guts.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.io import RangeReader, Sink
from hypersdk.options import reject_unknown_options

Progress = Callable[[int], None]


class Readable(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class DiskImage(ABC):
    """An opened image: the guest-visible disk, whatever the container format."""

    format: ClassVar[str]
    backing: DiskImage | None = None  # the image a delta reads through to (a backing file)

    def __init__(self, reader: RangeReader, virtual_size: int):
        self.reader = reader
        self.name = reader.name
        self.virtual_size = virtual_size

    @property
    def size(self) -> int:  # lets a DiskImage serve as a writer's source
        return self.virtual_size

    @abstractmethod
    def extents(self) -> ExtentMap:
        """Where data may be (allocated clusters, data runs). Outside them the disk reads as zeros
        (or as the backing file, which a reader resolves itself). May include zero-filled data."""

    def own_extents(self) -> ExtentMap:
        """What this image itself holds, leaving out what shows through from ``backing``
        (``hyperctl info`` reports each layer of a chain apart, as qemu-img does)."""
        return self.extents()

    def iter_extents(self) -> Iterator[Extent]:
        """``extents()`` in guest order, lazily where the image can (a raw file walks SEEK_DATA):
        a scan that streams them never holds a fragmented disk's whole allocation map."""
        return iter(self.extents())

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Guest-visible bytes; reads past the end raise FormatError/ValueError."""

    def zero_heads(self, start: int, stop: int, step: int, width: int = 8) -> list[int]:
        """Offsets in ``range(start, stop, step)`` whose first ``width`` bytes are zeros: the
        probe of a data scan. Images over a local file answer with a faster loop."""
        read = self.read
        return [
            off
            for off in range(start, stop, step)
            if not read(off, min(width, stop - off)).lstrip(b"\0")
        ]

    def info(self) -> dict:
        """Format-specific details for ``hyperctl info`` (subformat, cluster size, backing...)."""
        return {}

    def check(self) -> list[str]:
        """Consistency problems found (empty list: clean). Drivers override where they can."""
        return []

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Layout:
    """A planned output. ``total_size`` is the exact number of bytes ``write`` will emit."""

    virtual_size: int
    extents: ExtentMap
    total_size: int
    options: Mapping[str, str] = field(default_factory=dict)
    # Small side files some formats need next to the main stream (e.g. a VMDK descriptor):
    # name suffix -> bytes. Most formats leave it empty.
    extra_files: dict[str, bytes] = field(default_factory=dict)
    # Why this output cannot travel as one object (it needs side files that name it), or "".
    # A local convert writes the side files; an export stream refuses such a layout up front.
    not_streamable: str = ""

    # -- lifecycle: every step is declared here; layouts override what they need -------------
    def bind_output(self, path: str | os.PathLike) -> None:
        """Learn the output's final file name, before ``write``: side files that name the main
        output (a VMDK flat descriptor, an OVF naming its disks) are built here."""

    def measure(self, source: Readable, progress: Progress | None = None) -> int | None:
        """A sizing pass before ``write`` for layouts that know their exact size only after
        reading the data (compressed ones); returns ``total_size`` then. Others do nothing."""
        return None

    def release(self) -> None:
        """Free what ``measure`` holds (a spool), whether or not ``write`` ran."""


class FormatDriver(ABC):
    """One disk format. Subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other names for it (qemu-img's, e.g. "vpc")
    extensions: ClassVar[tuple[str, ...]] = ()
    # among drivers whose probe matches the same head, the highest priority wins
    probe_priority: ClassVar[int] = 0
    can_write: ClassVar[bool] = True
    # "disk": one disk image; "package": a whole VM (OVA), written from all disks at once;
    # "delta": the backup repository's delta (hsdelta), written by backups, never an output;
    # "refused": a format recognised by its magic and refused by name (formats/refused.py)
    kind: ClassVar[str] = "disk"
    supports_backing: ClassVar[bool] = False  # can a written image defer to a base (deltas)?
    option_names: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def probe(self, head: bytes, size: int) -> bool:
        """True if ``head`` (the first 64 KiB, or less for small files) looks like this format."""

    def probe_tail(self, tail: bytes, size: int) -> bool:
        """True if the last 512 bytes mark this format (formats with a trailing footer only,
        like a fixed VHD); tried only when no driver recognised the head."""
        return False

    @abstractmethod
    def open(self, reader: RangeReader) -> DiskImage: ...

    def plan(
        self, size: int, extents: ExtentMap, options: Mapping[str, str] | None = None
    ) -> Layout:
        raise InvalidParameterError(f"format {self.name!r} cannot be written")

    def write(
        self, source: Readable, layout: Layout, out: Sink, progress: Progress | None = None
    ) -> None:
        raise InvalidParameterError(f"format {self.name!r} cannot be written")

    def check_options(self, options: Mapping[str, str] | None) -> dict[str, str]:
        """Reject option names this driver does not know, with the list it does."""
        options = dict(options or {})
        reject_unknown_options(f"format {self.name!r}", options, self.option_names)
        return options


def emit(
    driver: FormatDriver,
    source: Readable,
    layout: Layout,
    out: Sink,
    progress: Progress | None = None,
    measure_source: Readable | None = None,
) -> None:
    """The one way a planned output is produced (local convert and export pipeline alike):
    the layout's sizing pass if it has one, the ordered write, and always the release.

    ``measure_source`` is what the sizing pass reads (default: ``source``); the pipeline passes
    the unobserved source so a sizing pass is not hashed as if it were the export's reads.
    """
    try:
        layout.measure(measure_source or source, progress)
        driver.write(source, layout, out, progress)
    finally:
        layout.release()
