"""The two provider interfaces: Source (where VMs come from) and Target (where exports go).

SDK calls live in the implementations (one module each under sources/ and targets/) and nowhere
else. Both are plain Python, usable without Prefect; tasks wrap them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol

from hypersdk.errors import VMNotFoundError
from hypersdk.extents import ExtentMap
from hypersdk.io import RangeReader, Sink
from hypersdk.models import DiskInfo, ObjectInfo, Snapshot, VMInfo

Progress = Callable[[int], None]


@dataclass
class DiskChanges:
    """What to move for one disk: the extents, and the change id to ask from next time."""

    extents: ExtentMap
    change_id: str | None
    since: str | None  # the change id these extents are relative to; None = full
    note: str = ""  # why a full export happened when an incremental was asked, etc.

    @property
    def incremental(self) -> bool:
        return self.since is not None


class ChangeTracker(Protocol):
    """Records a snapshot's change state from the reads of its full export (see
    ``Source.change_tracker``): fed every read, committed once the export is published."""

    def observe(self, offset: int, data: bytes | memoryview) -> None: ...

    def commit(self) -> None: ...


class Source(ABC):
    """A place VMs live: hypervisor, cloud, or the local directory provider."""

    schemes: ClassVar[tuple[str, ...]]

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options) -> Source: ...

    @property
    @abstractmethod
    def url(self) -> str:
        """Where this source points, without credentials (safe to log)."""

    @abstractmethod
    def list_vms(self) -> list[VMInfo]: ...

    def get_vm(self, name: str) -> VMInfo:
        for vm in self.list_vms():
            if name in (vm.name, vm.id):
                return vm
        raise VMNotFoundError(f"VM {name!r} not found on {self.url}")

    @abstractmethod
    def create_snapshot(self, vm: str) -> Snapshot:
        """Take a point-in-time view of the VM's disks."""

    @abstractmethod
    def remove_snapshot(self, snap: Snapshot) -> None:
        """Drop the snapshot; must be safe to call twice and after partial failure."""

    @contextlib.contextmanager
    def snapshot(self, vm: str) -> Iterator[Snapshot]:
        snap = self.create_snapshot(vm)
        try:
            yield snap
        finally:
            self.remove_snapshot(snap)

    @abstractmethod
    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        """Extents of ``disk`` to move: changed since ``since`` (a change id), or all data if None.

        A source that cannot honour ``since`` (lost or reset change id) returns a full map with
        ``since=None`` and says why in ``note``: never silently less data. ``progress`` hears
        the bytes a long scan covers.
        """

    @abstractmethod
    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> RangeReader:
        """Random reads of the snapshot's disk (the guest-visible bytes). ``planned`` are the
        extents the export will read, in order (a source may fetch them ahead); ``progress``
        hears the bytes fetched."""

    def change_tracker(
        self, snap: Snapshot, disk: DiskInfo, changes: DiskChanges
    ) -> ChangeTracker | None:
        """For sources whose change tracking is a hash of the data: an observer that records the
        snapshot's change state from the export's own reads (one read pass instead of two).
        Sources with native change tracking (or state already recorded) return None."""
        return None

    def preflight(self, vm: VMInfo) -> None:
        """Check, without side effects, that ``vm``'s disks can be read (before any run)."""

    def verify_snapshot(self, snap: Snapshot) -> None:
        """Raise SnapshotError if the point-in-time view was disturbed while it was read
        (sources whose snapshots are only a checked promise, like a stopped local VM)."""

    def close(self) -> None:
        """Release sessions and connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectWriter(Sink, ABC):
    """A Sink onto one object of a target. Nothing is visible under the key until ``commit``."""

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written (and any pending multipart upload)."""


@dataclass(frozen=True)
class PendingUpload:
    """An upload a writer began and neither committed nor aborted (its run was killed): no
    object is visible under ``key``, yet what was sent stays on the target, and cloud stores
    bill it. ``Target.pending_uploads`` finds them, ``Target.abort_upload`` removes one."""

    key: str  # the object it would have become (relative to the target; best known)
    upload_id: str  # what tells it apart on the target (S3 upload id, temp file key...)
    started: datetime | None = None
    size: int | None = None  # bytes it holds, when the target says


class Target(ABC):
    """A storage target: local directory, S3, Azure Blob, GCS..."""

    schemes: ClassVar[tuple[str, ...]]

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options) -> Target: ...

    @property
    @abstractmethod
    def url(self) -> str:
        """Where this target points, without credentials (safe to log)."""

    @abstractmethod
    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter: ...

    @contextlib.contextmanager
    def open_writer(self, key: str, expected_size: int | None = None) -> Iterator[ObjectWriter]:
        """Atomic write: committed on clean exit, aborted (nothing visible) on any exception."""
        w = self.writer(key, expected_size)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        w.commit()

    @abstractmethod
    def open_reader(self, key: str) -> RangeReader: ...

    def open_coalesced(self, key: str, **options) -> RangeReader:
        """A reader for passes over a whole object (verify, restore): reads are served from
        large aligned blocks fetched ahead (hypersdk.coalesce; ``options`` go to
        CoalescingReader), so a pass costs about size / 8 MiB requests, not one per small
        read. Targets whose reads are already cheap return ``open_reader``'s reader."""
        from hypersdk.coalesce import CoalescingReader

        reader = self.open_reader(key)
        try:
            return CoalescingReader(reader, **options)
        except BaseException:
            reader.close()
            raise

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if no object is there: True if this call created
        it, False if one already existed (left as it was). Atomic against concurrent callers,
        on this host or any other: exactly one of them gets True (repository locks rely on it).
        A retried request whose first attempt did create the object may answer False: callers
        that must know tell their own object by its content."""

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.open_writer(key, len(data)) as w:
            w.write(data)

    def get_bytes(self, key: str) -> bytes:
        r = self.open_reader(key)
        try:
            return r.read(0, r.size)
        finally:
            r.close()

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """The uploads under ``prefix`` that were begun and never committed nor aborted (see
        PendingUpload). Each target says what its writers leave behind when killed: S3
        multipart uploads, Azure uncommitted blobs, local temporary files; a target whose
        unfinished writes leave nothing it can find returns [] and says why. Callers must
        hold whatever keeps live writers away (the repository lock): a write in progress is
        listed too. NotImplementedError from a target that cannot tell."""
        raise NotImplementedError(f"{type(self).__name__} cannot list unfinished uploads")

    def abort_upload(self, upload: PendingUpload) -> None:
        """Discard ``upload`` (from ``pending_uploads``) and what it holds. Never touches a
        committed object, even one under the same key; an upload already gone is no error."""
        raise NotImplementedError(f"{type(self).__name__} cannot abort unfinished uploads")

    def preflight(self) -> None:
        """Check, without side effects, that the target can take objects (before any run):
        TargetError (or CredentialsError) with one line if not."""

    def location(self, key: str) -> str:
        """A human-readable URL for ``key`` (for summaries)."""
        return f"{self.url.rstrip('/')}/{key}"

    def close(self) -> None:
        """Release clients and connections."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
