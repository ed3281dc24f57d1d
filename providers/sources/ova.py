"""The OVA source: an .ova file, an .ovf file or a directory holding one, as a one-VM source.

``ova:///path/vm.ova`` (or ``ova:///path/dir``). The package is an immutable file, so a snapshot
is only a view (consistency "clone"): nothing is created or removed. Changed extents are always
all allocated data (an OVA carries no change history): a ``since`` gets a full map and a note.
``open_disk`` gives the guest bytes of a disk whatever its container (streamOptimized VMDK as a
tar member, or any image next to the .ovf).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import unquote, urlsplit

from hypersdk.errors import InvalidParameterError, SnapshotError, SourceError, VMNotFoundError
from hypersdk.extents import ExtentMap
from hypersdk.formats.base import DiskImage
from hypersdk.formats.ova import Package
from hypersdk.models import DiskInfo, Snapshot, SnapshotDisk, VMInfo
from providers.base import DiskChanges, Progress, Source


class OvaSource(Source):
    schemes = ("ova",)

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._package: Package | None = None

    @classmethod
    def from_url(cls, url: str, **options) -> OvaSource:
        if options:
            raise InvalidParameterError(f"ova source takes no options (got {', '.join(options)})")
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.scheme == "ova" else url
        if not path:
            raise InvalidParameterError(f"ova source URL has no path: {url!r}")
        return cls(path)

    @property
    def url(self) -> str:
        return f"ova://{self.path}"

    def package(self) -> Package:
        if self._package is None:
            if not os.path.exists(self.path):
                raise SourceError(f"{self.path}: no such OVA file or OVF directory")
            self._package = Package(self.path)
        return self._package

    def list_vms(self) -> list[VMInfo]:
        return [self.package().vm]

    def create_snapshot(self, vm: str) -> Snapshot:
        info = self.get_vm(vm)
        return Snapshot(
            id=f"ova-{uuid.uuid4().hex[:12]}",
            vm=info,
            disks=[SnapshotDisk(disk=d) for d in info.disks],
            consistency="clone",  # the package is immutable: the file itself is the snapshot
            provider_data={"path": self.path},
        )

    def remove_snapshot(self, snap: Snapshot) -> None:
        """Nothing was created."""

    def get_vm(self, name: str) -> VMInfo:
        vm = self.package().vm
        if name not in (vm.name, vm.id):
            raise VMNotFoundError(f"VM {name!r} not found in {self.path} (it holds {vm.name!r})")
        return vm

    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> DiskImage:
        pkg = self.package()
        for df in pkg.disk_files:
            if df.disk.name == disk.name or (disk.key and df.disk_id == disk.key):
                return pkg.open_disk(df)
        raise SnapshotError(
            f"VM {snap.vm.name!r} in {self.path} has no disk file for {disk.name!r}"
        )

    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        image = self.open_disk(snap, disk)
        try:
            extents = image.extents()
        finally:
            image.close()
        note = ""
        if since is not None:
            note = f"an OVA has no change tracking: full export instead of changes since {since}"
        return DiskChanges(extents, None, None, note=note)

    def close(self) -> None:
        if self._package is not None:
            self._package.close()
            self._package = None


SOURCE = OvaSource
