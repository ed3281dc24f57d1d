"""Export manifests: what an export holds and the hashes that prove it, as JSON.

One manifest per export, written last (its presence marks the export complete), listing per disk:
the stored object (key, size, BLAKE3 of its bytes), the logical disk ranges it defines with a
BLAKE3 hash per chunk (a full export defines the whole disk; a delta only the changed extents),
change ids for the next incremental, and encryption parameters (never keys).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import blake3
from pydantic import BaseModel, Field

from hypersdk import __version__
from hypersdk.extents import ExtentMap
from hypersdk.models import VMInfo

SCHEMA = "hypersdk.export/v1"
CHUNK_SIZE = 4 * 1024 * 1024
_ZERO_CHUNK_HASH: dict[int, str] = {}


_ZEROS = memoryview(bytes(1024 * 1024))


def zero_hash(length: int) -> str:
    """BLAKE3 of ``length`` zero bytes (cached: full exports have many zero chunks)."""
    h = _ZERO_CHUNK_HASH.get(length)
    if h is None:
        h = _ZERO_CHUNK_HASH[length] = blake3.blake3(
            bytes(length), max_threads=blake3.blake3.AUTO
        ).hexdigest()
    return h


class DiskManifest(BaseModel):
    name: str
    virtual_size: int
    format: str
    format_options: dict[str, str] = Field(default_factory=dict)
    key: str = Field(description="Object key of the stored disk, relative to the target")
    member: str | None = Field(default=None, description="The disk's file inside a package (OVA)")
    object_size: int
    object_blake3: str
    base_key: str | None = Field(default=None, description="The export this delta builds on")
    change_id: str | None = None
    since_change_id: str | None = None
    data_bytes: int = Field(description="Non-zero guest bytes carried")
    defined_bytes: int = Field(description="Guest bytes this export defines (data + zeroed)")
    chunk_size: int = CHUNK_SIZE
    chunks: list[tuple[int, int, str]] = Field(
        description="(offset, length, blake3 hex) over the guest bytes this export defines"
    )
    encryption: dict[str, Any] | None = None
    note: str = ""


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

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2, by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ExportManifest:
        return cls.model_validate_json(data)


def defined_map(extents: ExtentMap, full: bool) -> ExtentMap:
    """The guest ranges an export defines: everything for a full export, the extents for a delta."""
    return ExtentMap.full(extents.size) if full else ExtentMap(extents.size, [*extents])


class ChunkHasher:
    """BLAKE3 per chunk of the guest bytes an export defines, fed by in-order reads.

    The pipeline sees the writer's reads in disk order; bytes of ``defined`` that no read covers
    are zeros by construction (the extent map says so). A read that arrives out of order marks
    the hasher ``stale`` and the pipeline re-hashes from the source instead of trusting it.
    """

    def __init__(self, defined: ExtentMap, data: ExtentMap, chunk: int = CHUNK_SIZE):
        self.chunk = chunk
        self._pieces = list(defined.split(chunk))
        self._data = list(data.data())
        self._idx = 0
        self._pos = self._pieces[0].offset if self._pieces else 0
        self._hasher = blake3.blake3()
        self.chunks: list[tuple[int, int, str]] = []
        self.stale = False

    def _is_data(self, start: int, end: int) -> bool:
        return any(e.offset < end and start < e.end for e in self._data)

    def _advance_zero(self, until: int) -> None:
        """Treat [pos, until) of defined pieces as zeros."""
        while self._idx < len(self._pieces) and self._pos < until:
            piece = self._pieces[self._idx]
            if self._pos < piece.offset:
                self._pos = min(piece.offset, until)
                continue
            stop = min(piece.end, until)
            if self._pos == piece.offset and stop == piece.end:
                self.chunks.append((piece.offset, piece.length, zero_hash(piece.length)))
                self._idx += 1
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
        piece = self._pieces[self._idx]
        if self._pos >= piece.end:
            self.chunks.append((piece.offset, piece.length, self._hasher.hexdigest()))
            self._hasher = blake3.blake3()
            self._idx += 1

    def feed(self, offset: int, data: bytes) -> None:
        if self.stale or self._idx >= len(self._pieces):
            return
        end = offset + len(data)
        if end <= self._pos:
            return  # a re-read of bytes already hashed
        if offset > self._pos:
            if self._is_data(self._pos, offset):
                self.stale = True  # a read skipped over data: order broken, rehash later
                return
            self._advance_zero(offset)
        view = memoryview(data)[max(0, self._pos - offset) :]
        pos = max(offset, self._pos)
        while view and self._idx < len(self._pieces):
            piece = self._pieces[self._idx]
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
            self._advance_zero(self._pieces[-1].end if self._pieces else 0)
        return self.chunks


def hash_chunks(source, defined: ExtentMap, chunk: int = CHUNK_SIZE) -> list[tuple[int, int, str]]:
    """Hash the defined ranges by reading ``source`` (verification, or a stale ChunkHasher)."""
    from hypersdk.io import read_pieces

    out = []
    for piece, data in read_pieces(source, defined.split(chunk), chunk=chunk, threads=2):
        out.append((piece.offset, piece.length, blake3.blake3(data).hexdigest()))
    return out
