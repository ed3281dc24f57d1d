"""One disk export as one stream: source reads -> format writer -> (encryptor) -> target object.

No staging copy: memory holds a few chunk buffers whatever the disk size. Each stage is timed
(reads, conversion, encryption, upload) so summaries and benchmarks show where time goes, and the
guest bytes the writer reads are hashed on the way for the manifest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver
from hypersdk.formats.base import Readable
from hypersdk.io import Sink, TeeSink
from hypersdk.manifest import ChunkHasher, chunk_size_for, defined_map, hash_chunks

Progress = Callable[[int], None]


@dataclass
class StageStats:
    bytes: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass
class StreamResult:
    virtual_size: int
    data_bytes: int
    defined_bytes: int
    object_size: int
    object_blake3: str
    chunks: list[tuple[int, int, str]]
    encryption: dict[str, Any] | None
    wall_seconds: float
    chunk_size: int = 0
    stages: dict[str, StageStats] = field(default_factory=dict)

    @property
    def skipped_bytes(self) -> int:
        """Guest bytes never read: zeros, holes and (for a delta) unchanged blocks."""
        return self.virtual_size - self.data_bytes


class _ObservedSource:
    """Times and counts the writer's reads and feeds them, in order, to the chunk hasher."""

    def __init__(
        self,
        inner: Readable,
        hasher: ChunkHasher,
        progress: Progress | None,
        observers: Sequence[Any] = (),
    ):
        self._inner = inner
        self._observers = tuple(observers)
        self.size = inner.size
        self.name = getattr(inner, "name", "<source>")
        self._hasher = hasher
        self._progress = progress
        self._lock = threading.Lock()
        self.stats = StageStats()
        self._hashing = None
        if hasattr(inner, "readinto"):  # offer the fast path only when the source has it
            self.readinto = self._readinto

    def _observe(self, offset: int, data: bytes | memoryview, seconds: float) -> None:
        with self._lock:
            self.stats.seconds += seconds
            self.stats.bytes += len(data)
            self._hasher.feed(offset, data)
            for observer in self._observers:  # e.g. a change tracker building a block map
                observer.observe(offset, data)
        if self._progress:
            self._progress(len(data))

    def read(self, offset: int, length: int) -> bytes:
        started = time.perf_counter()
        data = self._inner.read(offset, length)
        self._observe(offset, data, time.perf_counter() - started)
        return data

    def _readinto(self, offset: int, view: memoryview):
        """Read, then hash on the observer's own thread (in order), so neither the reads nor the
        writer wait for hashing; read_pieces keeps the buffer until the returned future is done."""
        started = time.perf_counter()
        self._inner.readinto(offset, view)
        if self._hashing is None:
            from concurrent.futures import ThreadPoolExecutor

            self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-hash")
        return self._hashing.submit(self._observe, offset, view, time.perf_counter() - started)

    def close(self) -> None:
        if self._hashing is not None:
            self._hashing.shutdown(wait=True)


class _TimedSink:
    """Measures the time spent inside the downstream sink (inclusive)."""

    def __init__(self, inner: Sink):
        self._inner = inner
        self.stats = StageStats()

    def write(self, data) -> int:
        t = time.perf_counter()
        n = self._inner.write(data)
        self.stats.seconds += time.perf_counter() - t
        self.stats.bytes += n
        return n

    def write_zeros(self, length: int) -> None:
        t = time.perf_counter()
        self._inner.write_zeros(length)
        self.stats.seconds += time.perf_counter() - t
        self.stats.bytes += length

    def tell(self) -> int:
        return self._inner.tell()

    def finish(self) -> None:
        t = time.perf_counter()
        finish = getattr(self._inner, "finish", None)
        if finish:
            finish()
        self.stats.seconds += time.perf_counter() - t


class _OutputChain:
    """What every writer emits into: (encryptor ->) hash of stored bytes -> target, all timed."""

    def __init__(self, out: Sink, encryption: Any | None):
        self.object_hash = blake3.blake3()
        self.upload = _TimedSink(TeeSink(out, self.object_hash))
        self.encryption_params = None
        self._encrypt: _TimedSink | None = None
        self.sink: Sink = self.upload
        self._encryptor = None
        if encryption is not None:
            from hypersdk.crypto import encrypting_sink

            self._encryptor = encrypting_sink(encryption, self.upload)
            self._encrypt = self.sink = _TimedSink(self._encryptor)

    def finish(self) -> None:
        """Seal the encrypted stream (its final chunk) and record its parameters (never a key)."""
        if self._encryptor is not None:
            from hypersdk.crypto import object_params

            self._encrypt.finish()
            self.encryption_params = object_params(self._encryptor)

    def close(self) -> None:
        """Release the encryptor's threads or gpg process (after finish, or on failure)."""
        if self._encryptor is not None:
            self._encryptor.close()

    def stages(self, reads: StageStats, data_bytes: int, wall: float) -> dict[str, StageStats]:
        stages = {"read": reads, "upload": self.upload.stats}
        sink_time = self._encrypt.stats.seconds if self._encrypt else self.upload.stats.seconds
        if self._encrypt is not None:
            stages["encrypt"] = StageStats(
                self._encrypt.stats.bytes,
                max(0.0, self._encrypt.stats.seconds - self.upload.stats.seconds),
            )
        stages["convert"] = StageStats(data_bytes, max(0.0, wall - sink_time - reads.seconds))
        return stages


def export_stream(
    source: Readable,
    extents: ExtentMap,
    full: bool,
    fmt: str,
    out: Sink,
    options: Mapping[str, str] | None = None,
    encryption: Any | None = None,
    progress: Progress | None = None,
    chunk_size: int | None = None,
    observers: Sequence[Any] = (),
) -> StreamResult:
    """Convert ``extents`` of ``source`` into ``fmt`` and stream it into ``out``.

    ``encryption`` is a hypersdk.crypto KeySpec (or None). ``out`` receives the final stored
    bytes; committing or aborting it is the caller's business. ``observers`` see every source
    read (``observe(offset, data)``), in order, off the writer's thread.
    """
    started = time.perf_counter()
    driver = get_driver(fmt)
    layout = driver.plan(source.size, extents, options or {})
    if layout.not_streamable:
        raise InvalidParameterError(layout.not_streamable)
    measure = getattr(layout, "measure", None)
    if measure is not None:
        # Compressed layouts know their exact size only after a sizing pass; the writer skips its
        # own pass when measured, so this costs nothing and the stream carries no padding.
        measure(source)
    defined = defined_map(extents, full)
    chunk_size = chunk_size or chunk_size_for(source.size)
    hasher = ChunkHasher(defined, extents, chunk_size)
    observed = _ObservedSource(source, hasher, progress, observers)
    chain = _OutputChain(out, encryption)
    try:
        driver.write(observed, layout, chain.sink, None)
        chain.finish()
    finally:
        observed.close()
        chain.close()
    wall = time.perf_counter() - started
    chunks = (
        hasher.finish() if not hasher.stale else hash_chunks(source, defined, chunk_size, extents)
    )
    return StreamResult(
        virtual_size=source.size,
        data_bytes=extents.data_bytes,
        defined_bytes=defined.defined_bytes,
        object_size=chain.upload.stats.bytes,
        object_blake3=chain.object_hash.hexdigest(),
        chunks=chunks,
        chunk_size=chunk_size,
        encryption=chain.encryption_params,
        wall_seconds=wall,
        stages=chain.stages(observed.stats, extents.data_bytes, wall),
    )


@dataclass
class PackagedDisk:
    """One disk inside a VM package (OVA): its member name and logical chunk hashes."""

    member: str
    virtual_size: int
    data_bytes: int
    chunks: list[tuple[int, int, str]]
    chunk_size: int


def export_ova_stream(
    vm: Any,
    disks: list[tuple[Any, Readable, ExtentMap]],
    out: Sink,
    options: Mapping[str, str] | None = None,
    encryption: Any | None = None,
    progress: Progress | None = None,
) -> tuple[list[PackagedDisk], StreamResult]:
    """Stream an OVA of the VM (descriptor, manifest, streamOptimized disks) into ``out``."""
    from hypersdk.formats.ova import disk_member_names, write_ova

    started = time.perf_counter()
    # every disk of a package is exported whole, so each one defines its full size
    hashers = [
        ChunkHasher(ExtentMap.full(ext.size), ext, chunk_size_for(ext.size)) for _, _, ext in disks
    ]
    observed = [
        _ObservedSource(src, h, progress) for (_, src, _), h in zip(disks, hashers, strict=True)
    ]
    chain = _OutputChain(out, encryption)
    try:
        members = [(info, obs, ext) for (info, _, ext), obs in zip(disks, observed, strict=True)]
        write_ova(vm, members, chain.sink, None, options)
        chain.finish()
    finally:
        for obs in observed:
            obs.close()
        chain.close()
    wall = time.perf_counter() - started
    reads = StageStats(sum(o.stats.bytes for o in observed), sum(o.stats.seconds for o in observed))
    packaged = []
    names = disk_member_names(vm, len(disks))
    for (_, source, extents), hasher, name in zip(disks, hashers, names, strict=True):
        chunks = (
            hasher.finish()
            if not hasher.stale
            else hash_chunks(source, ExtentMap.full(extents.size), hasher.chunk, extents)
        )
        packaged.append(PackagedDisk(name, source.size, extents.data_bytes, chunks, hasher.chunk))
    data = sum(p.data_bytes for p in packaged)
    result = StreamResult(
        virtual_size=sum(p.virtual_size for p in packaged),
        data_bytes=data,
        defined_bytes=sum(p.virtual_size for p in packaged),
        object_size=chain.upload.stats.bytes,
        object_blake3=chain.object_hash.hexdigest(),
        chunks=[],
        encryption=chain.encryption_params,
        wall_seconds=wall,
        stages=chain.stages(reads, data, wall),
    )
    return packaged, result
