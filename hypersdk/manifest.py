"""Export manifests: what an export holds and the hashes that prove it, as JSON.

One manifest per export, written last (its presence marks the export complete), listing per disk:
the stored object (key, size, BLAKE3 of its bytes), the logical disk ranges it defines with a
BLAKE3 hash per chunk (a full export defines the whole disk; a delta only the changed extents),
change ids for the next incremental, and encryption parameters (never keys).

A manifest read back from a target is untrusted input: ``read_manifest`` bounds its size before
reading it, refuses schemas it does not know, and answers any malformed content with one
FormatError line naming the object. Its keys must be plain relative keys (no ``..``, ``.`` or
empty segments, not absolute) and its chunk list must be ordered, disjoint and inside the disk,
so nothing that acts on a manifest can be sent outside the target or made to read without end.
"""

from __future__ import annotations

import bisect
import re
from datetime import UTC, datetime
from typing import Any, Literal

import blake3
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hypersdk import __version__
from hypersdk.errors import FormatError
from hypersdk.extents import Extent, ExtentMap
from hypersdk.models import VMInfo
from hypersdk.references import printable

SCHEMA = "hypersdk.export/v2"
# v1: deltas were qcow2 images naming their base by path (base_key); still read
READABLE_SCHEMAS = ("hypersdk.export/v1", SCHEMA)
# A fully written 1 TiB disk takes ~37 MB of chunk list: this leaves room for several of them,
# and refuses a planted multi-gigabyte "manifest" before it is read.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNKS = 256 * 1024  # chunk size grows past 1 TiB so a manifest stays small
ZERO = "zero"  # a chunks entry whose bytes are all zeros; consecutive zero chunks merge into one


def chunk_size_for(size: int) -> int:
    """4 MiB chunks up to 1 TiB, then the smallest power-of-two multiple within MAX_CHUNKS."""
    chunk = CHUNK_SIZE
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
    return chunk


_ZEROS = memoryview(bytes(1024 * 1024))
_DIGEST = re.compile(r"[0-9a-f]{64}")


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a plain object key relative to the target, or None."""
    if not key:
        return "is empty"
    if key.startswith("/"):
        return "is absolute"
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        return "has an empty, '.' or '..' segment"
    if not key.isprintable():
        return "holds control characters"
    return None


class ParentLink(BaseModel):
    """The point a delta builds on: by export id, disk name and its stored object's BLAKE3,
    never by path, so a chain restores from any target (docs/repository.md)."""

    model_config = ConfigDict(extra="forbid")

    export_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
    disk: str = Field(min_length=1, max_length=255)
    key: str
    object_blake3: str = Field(pattern=r"^[0-9a-f]{64}$")
    virtual_size: int = Field(ge=0)

    @field_validator("key")
    @classmethod
    def _plain_key(cls, key: str) -> str:
        problem = key_problem(key)
        if problem:
            raise ValueError(f"object key {printable(key)!r} {problem}")
        return key


class ObjectRef(BaseModel):
    """A stored object another record points to (key and BLAKE3)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    object_blake3: str = Field(pattern=r"^[0-9a-f]{64}$")


class DiskManifest(BaseModel):
    name: str
    kind: Literal["full", "delta"] = Field(
        default="full", description="A standard image of the whole disk, or an HSDELTA on a parent"
    )
    parent: ParentLink | None = Field(default=None, description="The point a delta builds on")
    image_format: str | None = Field(
        default=None, description="The format of the chain's full: what a restore gives by default"
    )
    replaces: ObjectRef | None = Field(
        default=None,
        description="The delta a synthetic full replaced (forget): children naming it still match",
    )
    virtual_size: int = Field(ge=0)
    format: str
    format_options: dict[str, str] = Field(default_factory=dict)
    key: str = Field(description="Object key of the stored disk, relative to the target")
    member: str | None = Field(default=None, description="The disk's file inside a package (OVA)")
    object_size: int = Field(ge=0)
    object_blake3: str
    base_key: str | None = Field(default=None, description="The export this delta builds on")
    change_id: str | None = None
    since_change_id: str | None = None
    data_bytes: int = Field(ge=0, description="Non-zero guest bytes carried")
    defined_bytes: int = Field(ge=0, description="Guest bytes this export defines (data + zeroed)")
    chunk_size: int = Field(default=CHUNK_SIZE, ge=1)
    chunks: list[tuple[int, int, str]] = Field(
        description="(offset, length, blake3 hex) over the guest bytes this export defines; "
        "'zero' instead of a hash marks an all-zero range (consecutive zero chunks merge)"
    )
    encryption: dict[str, Any] | None = None
    note: str = ""

    @field_validator("key", "base_key")
    @classmethod
    def _plain_key(cls, key: str | None) -> str | None:
        problem = None if key is None else key_problem(key)
        if problem:
            raise ValueError(f"object key {printable(key)!r} {problem}")
        return key

    @model_validator(mode="after")
    def _delta_has_parent(self) -> DiskManifest:
        if (self.kind == "delta") != (self.parent is not None):
            raise ValueError("a delta names its parent, and only a delta does")
        if self.kind == "delta" and self.format != "hsdelta":
            raise ValueError(f"a delta is stored as hsdelta, not {printable(self.format)!r}")
        return self

    @model_validator(mode="after")
    def _chunks_inside_disk(self) -> DiskManifest:
        """Ordered, disjoint, inside the disk, hashes no longer than a chunk: verifying costs
        at most one read of the disk whatever the list says."""
        end = 0
        for offset, length, digest in self.chunks:
            if offset < end or length <= 0 or offset + length > self.virtual_size:
                raise ValueError(
                    f"chunk ({offset}, {length}) overlaps, is out of order or lies outside the "
                    f"disk ({self.virtual_size} bytes)"
                )
            if digest != ZERO and (length > self.chunk_size or not _DIGEST.fullmatch(digest)):
                raise ValueError(f"chunk at {offset}: not a BLAKE3 hex digest of one chunk")
            end = offset + length
        return self


class ExportManifest(BaseModel):
    schema_: str = Field(default=SCHEMA, alias="schema")
    export_id: str
    kind: Literal["full", "incremental"]
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    tool: str = f"hypersdk {__version__}"
    source: str
    vm: VMInfo
    snapshot_id: str
    snapshot_consistency: str
    disks: list[DiskManifest]
    stats: dict[str, Any] = Field(default_factory=dict)

    model_config = {"populate_by_name": True}

    def disk(self, name: str) -> DiskManifest:
        """The entry of disk ``name``; VerificationError naming the export if there is none."""
        for d in self.disks:
            if d.name == name:
                return d
        from hypersdk.errors import VerificationError

        raise VerificationError(f"export {self.export_id} has no disk {printable(name)!r}")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2, by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, name: str = "manifest") -> ExportManifest:
        """Parse a stored manifest; FormatError naming ``name`` (one line) when it is not one
        this version can read."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError(name, f"manifest larger than {MAX_MANIFEST_BYTES} bytes: refused")
        try:
            raw = pydantic_core.from_json(data)  # iterative parser: deep nesting is an error
        except ValueError as exc:
            raise FormatError(name, f"not a manifest: invalid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise FormatError(name, "not a manifest: JSON object expected")
        if "schema" not in raw:
            raise FormatError(name, f"not a manifest: no schema (this version reads {SCHEMA})")
        if raw["schema"] not in READABLE_SCHEMAS:
            shown = printable(repr(raw["schema"])[:80])
            raise FormatError(
                name,
                f"manifest schema {shown} is not supported (this version reads "
                f"{', '.join(READABLE_SCHEMAS)})",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            msg = first["msg"].removeprefix("Value error, ")
            more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
            raise FormatError(
                name, f"invalid manifest at {printable(where)}: {printable(msg)}{more}"
            ) from None


def read_manifest(target, key: str) -> ExportManifest:
    """The manifest stored under ``key`` on ``target``, its size checked before it is read."""
    reader = target.open_reader(key)
    try:
        if reader.size > MAX_MANIFEST_BYTES:
            raise FormatError(
                key, f"manifest of {reader.size} bytes is larger than {MAX_MANIFEST_BYTES}: refused"
            )
        data = reader.read(0, reader.size)
    finally:
        reader.close()
    return ExportManifest.from_json(data, key)


def defined_map(extents: ExtentMap, full: bool) -> ExtentMap:
    """The guest ranges an export defines: everything for a full export, the extents for a delta."""
    return ExtentMap.full(extents.size) if full else ExtentMap(extents.size, [*extents])


class _Chunks(list):
    """``chunks`` entries, merging consecutive all-zero ranges into one ``ZERO`` entry."""

    def add(self, offset: int, length: int, digest: str) -> None:
        if digest == ZERO and self and self[-1][2] == ZERO and sum(self[-1][:2]) == offset:
            self[-1] = (self[-1][0], self[-1][1] + length, ZERO)
        else:
            self.append((offset, length, digest))


class _DataIndex:
    """Does a range touch the data extents? (bisect over sorted, disjoint extents)."""

    def __init__(self, data: ExtentMap):
        spans = [(e.offset, e.end) for e in data.data()]
        self._starts = [a for a, _ in spans]
        self._ends = [b for _, b in spans]

    def touches(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._ends, start)  # first extent ending after start
        return i < len(self._starts) and self._starts[i] < end

    def within(self, start: int, end: int) -> list[Extent]:
        """The data extents inside [start, end), clipped to it."""
        out = []
        i = bisect.bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            a, b = max(self._starts[i], start), min(self._ends[i], end)
            out.append(Extent(a, b - a))
            i += 1
        return out


class ChunkHasher:
    """BLAKE3 per chunk of the guest bytes an export defines, fed by in-order reads.

    The pipeline sees the writer's reads in disk order; bytes of ``defined`` that no read covers
    are zeros by construction (the extent map says so), and whole chunks of them are recorded as
    ``ZERO`` runs, so a manifest grows with the data, not with the disk. A read that arrives out
    of order marks the hasher ``stale`` and the pipeline re-hashes from the source instead.
    """

    def __init__(self, defined: ExtentMap, data: ExtentMap, chunk: int = CHUNK_SIZE):
        self.chunk = chunk
        self._pieces = iter(defined.split(chunk))  # lazily: a huge disk has millions of chunks
        self._piece = next(self._pieces, None)
        self._data = _DataIndex(data)
        self._pos = self._piece.offset if self._piece else 0
        self._hasher = blake3.blake3()
        self.chunks = _Chunks()
        self.stale = False

    def _next_piece(self) -> None:
        self._piece = next(self._pieces, None)

    def _advance_zero(self, until: int) -> None:
        """Treat [pos, until) of defined pieces as zeros."""
        while self._piece is not None and self._pos < until:
            piece = self._piece
            if self._pos < piece.offset:
                self._pos = min(piece.offset, until)
                continue
            stop = min(piece.end, until)
            if self._pos == piece.offset and stop == piece.end:
                self.chunks.add(piece.offset, piece.length, ZERO)
                self._next_piece()
                self._pos = piece.end
                continue
            zeros = stop - self._pos
            while zeros:  # from one shared zero buffer: no allocation per gap
                n = min(zeros, len(_ZEROS))
                self._hasher.update(_ZEROS[:n])
                zeros -= n
            self._pos = stop
            self._close_piece_if_done()

    def _close_piece_if_done(self) -> None:
        piece = self._piece
        if self._pos >= piece.end:
            self.chunks.add(piece.offset, piece.length, self._hasher.hexdigest())
            self._hasher = blake3.blake3()
            self._next_piece()

    def feed(self, offset: int, data: bytes) -> None:
        if self.stale or self._piece is None:
            return
        end = offset + len(data)
        if end <= self._pos:
            return  # a re-read of bytes already hashed
        if offset > self._pos:
            if self._data.touches(self._pos, offset):
                self.stale = True  # a read skipped over data: order broken, rehash later
                return
            self._advance_zero(offset)
        view = memoryview(data)[max(0, self._pos - offset) :]
        pos = max(offset, self._pos)
        while view and self._piece is not None:
            piece = self._piece
            if pos < piece.offset:  # gap between defined pieces (delta): skip
                skip = min(len(view), piece.offset - pos)
                view, pos = view[skip:], pos + skip
                self._pos = pos
                continue
            n = min(len(view), piece.end - pos)
            self._hasher.update(view[:n])
            view, pos = view[n:], pos + n
            self._pos = pos
            self._close_piece_if_done()

    def finish(self) -> list[tuple[int, int, str]]:
        if not self.stale:
            self._advance_zero(2**63)
        return list(self.chunks)


def _io_pieces(spans):
    """``spans`` (ascending extents) cut into IO-sized reads: bounded buffers whatever the chunk."""
    from hypersdk.io import IO_CHUNK

    for span in spans:
        yield from ExtentMap(span.end, [span]).split(IO_CHUNK)


def _take(reads, length: int):
    """The next views of ``reads`` that together cover ``length`` bytes."""
    got = 0
    while got < length:
        _, view = next(reads)
        got += len(view)
        yield view


def hash_chunks(
    source, defined: ExtentMap, chunk: int = CHUNK_SIZE, data: ExtentMap | None = None
) -> list[tuple[int, int, str]]:
    """The ``chunks`` entries of ``defined`` by reading ``source`` (a stale ChunkHasher). Chunks
    that touch no ``data`` extent are zero runs and are not read."""
    from hypersdk.io import read_pieces

    index = _DataIndex(data if data is not None else defined)
    touched = (p for p in defined.split(chunk) if index.touches(p.offset, p.end))
    reads = read_pieces(source, _io_pieces(touched), threads=2)
    out = _Chunks()
    for piece in defined.split(chunk):
        if not index.touches(piece.offset, piece.end):
            out.add(piece.offset, piece.length, ZERO)
            continue
        h = blake3.blake3()
        for view in _take(reads, piece.length):
            h.update(view)
        out.add(piece.offset, piece.length, h.hexdigest())
    return list(out)


def check_chunks(source, chunks: list[tuple[int, int, str]], data: ExtentMap) -> list[int]:
    """Offsets of the ``chunks`` entries ``source`` does not match. A ZERO entry is checked by
    reading only where ``source`` may hold data (its extents), so a big empty disk costs little.
    All entries are read as one stream (one reader ring for the whole disk)."""
    from hypersdk.blockmap import is_zero
    from hypersdk.io import read_pieces

    index = _DataIndex(data)

    def spans(offset: int, length: int, digest: str) -> list[Extent]:
        end = offset + length
        return index.within(offset, end) if digest == ZERO else [Extent(offset, length)]

    wanted = (span for entry in chunks for span in spans(*entry))
    reads = read_pieces(source, _io_pieces(wanted), threads=2)
    bad = []
    for offset, length, digest in chunks:
        views = _take(reads, sum(e.length for e in spans(offset, length, digest)))
        if digest == ZERO:
            ok = all([is_zero(v) for v in views])  # a list: consume every view even after a miss
        else:
            h = blake3.blake3()
            for view in views:
                h.update(view)
            ok = h.hexdigest() == digest
        if not ok:
            bad.append(offset)
    return bad
