"""One disk export as one stream: download -> convert -> (encrypt) -> upload.

The four stages run at once over bounded in-memory streams (hypersdk.stages): no staging copy,
memory holds a few buffers whatever the disk size. Each stage keeps its own bytes and time, so
summaries, benchmarks and the Prefect flow graph show where time goes; the guest bytes the
writer reads are hashed on the way for the manifest.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from hypersdk.errors import InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver
from hypersdk.formats.base import Readable, emit
from hypersdk.io import Sink, TeeSink
from hypersdk.manifest import ChunkHasher, chunk_size_for, defined_map, hash_chunks
from hypersdk.stages import JobQueue, Pipe, StageAborted, StagedSource, StageStats

Progress = Callable[[int], None]


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
    stages: dict[str, StageStats] = field(default_factory=dict)  # download, convert, ...

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
        self.stats = StageStats("read")
        self._hashing = None
        if hasattr(inner, "readinto"):  # offer the fast path only when the source has it
            self.readinto = self._readinto

    def _observe(self, offset: int, data: bytes | memoryview, seconds: float) -> None:
        with self._lock:
            self.stats.busy += seconds
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


Runner = Callable[["ExportStream"], None]


class ExportStream:
    """One export as stages over bounded in-memory streams (hypersdk.stages): download (the
    source reads), convert (``produce``, the format writer), encrypt (when asked) and upload
    (the stored bytes into ``out``). The stored bytes are hashed by the stage that makes them
    (convert, or encrypt), which keeps that work off the upload stage.

    Whoever runs it calls ``run_stage(name)`` for every name in ``stage_names``, each on its
    own thread and all at once: ``run_in_threads`` does that with plain threads; the Prefect
    tasks run one task per stage. ``produce(sink)`` emits the output into ``sink`` and reads
    its sources through ``staged(...)`` wrappers, so every read runs on the download stage.
    """

    def __init__(
        self,
        produce: Callable[[Sink], None],
        out: Sink,
        encryption: Any | None = None,
        download_workers: int = 1,
    ):
        self._produce = produce
        self._out = out
        self.stats = {name: StageStats(name) for name in ("download", "convert", "upload")}
        self.jobs = JobQueue(self.stats["download"])
        self._download_workers = max(1, download_workers)
        self.object_hash = blake3.blake3()
        self._to_upload = Pipe("upload")
        self._to_encrypt: Pipe | None = None
        self._encryptor = None
        self.encryption_params: dict[str, Any] | None = None
        if encryption is not None:
            from hypersdk.crypto import encrypting_sink

            self.stats["encrypt"] = StageStats("encrypt")
            self._to_encrypt = Pipe("encrypt")
            # the stored bytes are hashed where they are made: here, after sealing
            self._encryptor = encrypting_sink(
                encryption, TeeSink(self._to_upload, self.object_hash)
            )
        self.failure: BaseException | None = None

    @property
    def stage_names(self) -> list[str]:
        """In stream order."""
        names = ["download", "convert", "upload"]
        if self._encryptor is not None:
            names.insert(2, "encrypt")
        return names

    def staged(self, source: Any) -> StagedSource:
        """``source`` with its reads run by the download stage."""
        return StagedSource(source, self.jobs)

    def run_stage(self, name: str) -> StageStats:
        """Run one stage to its end (blocking); returns its statistics."""
        work = {
            "download": self._download,
            "convert": self._convert,
            "encrypt": self._encrypt,
            "upload": self._upload,
        }[name]
        try:
            work()
        except BaseException as exc:
            self.abort(exc)
            raise
        return self.stats[name]

    def abort(self, exc: BaseException) -> None:
        """Stop every stage: the first failure is the one reported."""
        if self.failure is None and not isinstance(exc, StageAborted):
            self.failure = exc
        reason = StageAborted(f"stopped because the export failed: {self.failure or exc}")
        self.jobs.abort(reason)
        for pipe in (self._to_encrypt, self._to_upload):
            if pipe is not None:
                pipe.abort(reason)

    # -- the stages ---------------------------------------------------------------------------
    def _download(self) -> None:
        extra = [
            threading.Thread(target=self._download_worker, name=f"download-{i}", daemon=True)
            for i in range(1, self._download_workers)
        ]
        for t in extra:
            t.start()
        try:
            self.jobs.work()
        finally:
            for t in extra:
                t.join()

    def _download_worker(self) -> None:
        with contextlib.suppress(BaseException):  # the first worker reports failures
            self.jobs.work()

    def _convert(self) -> None:
        stats = self.stats["convert"]
        stats.begin()
        cpu = time.thread_time()
        first = self._to_encrypt or self._to_upload
        try:
            # unencrypted, the stored bytes are the writer's: hash them here, off the upload
            # stage (the critical path of a page-cache target is hashing plus writing)
            self._produce(first if self._to_encrypt else TeeSink(first, self.object_hash))
            first.close_write()
        finally:
            self.jobs.close()
            stats.busy = time.thread_time() - cpu
            stats.bytes = first.tell()
            stats.finish()

    def _encrypt(self) -> None:
        assert self._to_encrypt is not None and self._encryptor is not None
        from hypersdk.crypto import object_params

        stats = self.stats["encrypt"]
        try:
            self._to_encrypt.drain(self._encryptor, stats)
            started = time.perf_counter()
            self._encryptor.finish()  # the final chunk, sealed as final
            stats.busy += time.perf_counter() - started
            self.encryption_params = object_params(self._encryptor)
            self._to_upload.close_write()
        finally:
            self._encryptor.close()
            stats.busy = max(0.0, stats.busy - self._to_upload.producer_wait)
            stats.finish()

    def _upload(self) -> None:
        self._to_upload.drain(self._out, self.stats["upload"])

    @property
    def object_size(self) -> int:
        return self._to_upload.tell()


def run_in_threads(stream: ExportStream) -> None:
    """The engine's runner: every stage on a thread of its own (convert on the caller's)."""
    threads = [
        threading.Thread(target=_quietly, args=(stream, name), name=f"stage-{name}", daemon=True)
        for name in stream.stage_names
        if name != "convert"
    ]
    for t in threads:
        t.start()
    try:
        stream.run_stage("convert")
    except BaseException as exc:
        stream.abort(exc)
    finally:
        for t in threads:
            t.join()
    if stream.failure is not None:
        raise stream.failure


def _quietly(stream: ExportStream, name: str) -> None:
    with contextlib.suppress(BaseException):  # recorded as stream.failure
        stream.run_stage(name)


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
    runner: Runner | None = None,
    download_workers: int = 1,
) -> StreamResult:
    """Convert ``extents`` of ``source`` into ``fmt`` and stream it into ``out``.

    ``encryption`` is a hypersdk.crypto KeySpec (or None). ``out`` receives the final stored
    bytes; committing or aborting it is the caller's business. ``observers`` see every source
    read (``observe(offset, data)``), in order, off the writer's thread. ``runner`` runs the
    stages (default: ``run_in_threads``; the Prefect tasks pass one that runs each as a task).
    """
    job = DiskExport(
        source,
        extents,
        full,
        fmt,
        out,
        options,
        encryption,
        progress,
        chunk_size,
        observers,
        download_workers,
    )
    (runner or run_in_threads)(job)
    return job.result()


class DiskExport(ExportStream):
    """One disk into one object: the plan is made (and refused) before any stage starts."""

    def __init__(
        self,
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
        download_workers: int = 1,
    ):
        self.started = time.perf_counter()
        self.driver = get_driver(fmt)
        self.layout = self.driver.plan(source.size, extents, options or {})
        if self.layout.not_streamable:
            raise InvalidParameterError(self.layout.not_streamable)
        self.source = source
        self.extents = extents
        self.defined = defined_map(extents, full)
        self.chunk_size = chunk_size or chunk_size_for(source.size)
        self.hasher = ChunkHasher(self.defined, extents, self.chunk_size)
        self.observed = _ObservedSource(source, self.hasher, progress, observers)
        super().__init__(self._write, out, encryption, download_workers)

    def _write(self, sink: Sink) -> None:
        try:
            # a sizing pass (compressed layouts) reads the plain source: only the write is
            # observed (hashed, recorded in the change map)
            emit(
                self.driver,
                self.staged(self.observed),
                self.layout,
                sink,
                None,
                measure_source=self.staged(self.source),
            )
        finally:
            self.observed.close()

    def result(self) -> StreamResult:
        wall = time.perf_counter() - self.started
        chunks = (
            self.hasher.finish()
            if not self.hasher.stale
            else hash_chunks(self.source, self.defined, self.chunk_size, self.extents)
        )
        return StreamResult(
            virtual_size=self.source.size,
            data_bytes=self.extents.data_bytes,
            defined_bytes=self.defined.defined_bytes,
            object_size=self.object_size,
            object_blake3=self.object_hash.hexdigest(),
            chunks=chunks,
            chunk_size=self.chunk_size,
            encryption=self.encryption_params,
            wall_seconds=wall,
            stages=dict(self.stats),
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
    runner: Runner | None = None,
) -> tuple[list[PackagedDisk], StreamResult]:
    """Stream an OVA of the VM (descriptor, manifest, streamOptimized disks) into ``out``."""
    job = OvaExport(vm, disks, out, options, encryption, progress)
    (runner or run_in_threads)(job)
    return job.result()


class OvaExport(ExportStream):
    """The whole VM as one OVA object, through the same stages as a disk export."""

    def __init__(
        self,
        vm: Any,
        disks: list[tuple[Any, Readable, ExtentMap]],
        out: Sink,
        options: Mapping[str, str] | None = None,
        encryption: Any | None = None,
        progress: Progress | None = None,
    ):
        self.started = time.perf_counter()
        self.vm = vm
        self.disks = disks
        self.options = options
        # every disk of a package is exported whole, so each one defines its full size
        self.hashers = [
            ChunkHasher(ExtentMap.full(ext.size), ext, chunk_size_for(ext.size))
            for _, _, ext in disks
        ]
        self.observed = [
            _ObservedSource(src, h, progress)
            for (_, src, _), h in zip(disks, self.hashers, strict=True)
        ]
        super().__init__(self._write, out, encryption)

    def _write(self, sink: Sink) -> None:
        from hypersdk.formats.ova import write_ova

        members = [
            (info, self.staged(obs), ext)
            for (info, _, ext), obs in zip(self.disks, self.observed, strict=True)
        ]
        try:
            write_ova(self.vm, members, sink, None, self.options)
        finally:
            for obs in self.observed:
                obs.close()

    def result(self) -> tuple[list[PackagedDisk], StreamResult]:
        from hypersdk.formats.ova import disk_member_names

        wall = time.perf_counter() - self.started
        packaged = []
        names = disk_member_names(self.vm, len(self.disks))
        for (_, source, extents), hasher, name in zip(self.disks, self.hashers, names, strict=True):
            chunks = (
                hasher.finish()
                if not hasher.stale
                else hash_chunks(source, ExtentMap.full(extents.size), hasher.chunk, extents)
            )
            packaged.append(
                PackagedDisk(name, source.size, extents.data_bytes, chunks, hasher.chunk)
            )
        result = StreamResult(
            virtual_size=sum(p.virtual_size for p in packaged),
            data_bytes=sum(p.data_bytes for p in packaged),
            defined_bytes=sum(p.virtual_size for p in packaged),
            object_size=self.object_size,
            object_blake3=self.object_hash.hexdigest(),
            chunks=[],
            encryption=self.encryption_params,
            wall_seconds=wall,
            stages=dict(self.stats),
        )
        return packaged, result
