"""AwsSource: EC2 instances behind the Source interface.

URL: ``aws://REGION`` with options in the query (``endpoint_url``, ``profile``, ``workers``,
``attempts``, ``backoff``, ``snapshot_timeout``, ``keep_snapshots``); credentials only from
boto3's chain. A VM is an instance, named by its Name tag or its instance id; its disks are its
EBS volumes (named by device: ``/dev/sda1`` -> ``sda1``). A disk's change id is the EBS snapshot
id of its export; see snapshots.py for which snapshots stay and docs/aws.md.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from hypersdk.errors import InvalidParameterError, SourceError
from hypersdk.extents import ExtentMap
from hypersdk.models import DiskInfo, Snapshot, VMInfo
from hypersdk.references import printable
from providers.aws import snapshots
from providers.aws.blocks import Listing, SnapshotReader, block_extents
from providers.aws.client import Settings
from providers.aws.inventory import Inventory
from providers.base import DiskChanges, Progress, Source

SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,17}")


def region_of(url: str, scheme: str) -> tuple[str, str]:
    """(region, path) of ``scheme://REGION/path``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != scheme:
        raise InvalidParameterError(f"not an {scheme}:// URL: {printable(url)[:80]}")
    if parts.username or parts.password:
        raise InvalidParameterError(f"{scheme}:// URLs take no user info")
    return unquote(parts.hostname or ""), unquote(parts.path)


class _Tracker:
    """The disk's export is stored: keep its snapshot (the next incremental's base)."""

    def __init__(self, settings: Settings, snapshot_id: str, since: str | None):
        self._s, self._id, self._since = settings, snapshot_id, since

    def observe(self, offset: int, data: bytes | memoryview) -> None:
        """EBS tracks changes itself: nothing to record from the reads."""

    def commit(self) -> None:
        snapshots.commit(self._s, self._id, self._since)


class AwsSource(Source):
    schemes = ("aws",)

    def __init__(self, settings: Settings):
        self.s = settings
        self._inv = Inventory(settings)

    @classmethod
    def from_url(cls, url: str, **options) -> AwsSource:
        region, path = region_of(url, "aws")
        if path.strip("/"):
            raise InvalidParameterError(
                "aws:// URLs name a region only (aws://us-east-1): name the instance as the VM"
            )
        return cls(Settings.from_options(region, options, "aws source"))

    @property
    def url(self) -> str:
        return f"aws://{self.s.region}{self.s.query()}"

    def close(self) -> None:
        self.s.close()

    # -- inventory ------------------------------------------------------------------------------
    def list_vms(self) -> list[VMInfo]:
        return self._inv.list_vms()

    def get_vm(self, name: str) -> VMInfo:
        return self._inv.describe(self._inv.find(name))

    def preflight(self, vm: VMInfo) -> None:
        if not vm.disks:
            raise SourceError(f"EC2 instance {vm.id} ({vm.name}) has no EBS volume to export")

    # -- snapshots ------------------------------------------------------------------------------
    def create_snapshot(self, vm: str) -> Snapshot:
        return snapshots.create(self.s, self._inv, vm)

    def remove_snapshot(self, snap: Snapshot) -> None:
        snapshots.remove(self.s, snap)

    def _ebs_id(self, snap: Snapshot, disk: DiskInfo) -> str:
        sid = (snap.provider_data.get("ebs") or {}).get(disk.name)
        if not sid:
            raise SourceError(f"snapshot {snap.id} has no disk {disk.name!r}")
        return sid

    # -- changes ----------------------------------------------------------------------------------
    def _base_problem(self, since: str, disk: DiskInfo) -> str | None:
        """Why ``since`` cannot be the base of an incremental of ``disk``, or None."""
        if not SNAPSHOT_ID.fullmatch(since):
            return f"change id {printable(since)[:80]!r} is not an EBS snapshot id"
        base = snapshots.lookup(self.s, since)
        if base is None:
            return f"base snapshot {since} no longer exists"
        if base.get("State") != "completed":
            return f"base snapshot {since} is {base.get('State')}"
        if disk.key and base.get("VolumeId") != disk.key:
            return f"base snapshot {since} is of volume {base.get('VolumeId')}, not {disk.key}"
        return None

    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        new = self._ebs_id(snap, disk)
        note = ""
        if since is not None:
            problem = self._base_problem(since, disk)
            if problem is None:
                try:
                    extents = block_extents(Listing(self.s, new, since=since), disk.capacity)
                except SourceError as exc:
                    if "ResourceNotFound" not in str(exc) and "ValidationException" not in str(exc):
                        raise
                    problem = f"EBS cannot compare {since} with {new} ({exc})"
                else:
                    if progress:
                        progress(disk.capacity)
                    return DiskChanges(extents, new, since)
            note = f"{problem}: full export instead"
        extents = block_extents(Listing(self.s, new), disk.capacity)
        if progress:
            progress(disk.capacity)
        return DiskChanges(extents, new, None, note=note)

    def change_tracker(self, snap: Snapshot, disk: DiskInfo, changes: DiskChanges) -> _Tracker:
        return _Tracker(self.s, self._ebs_id(snap, disk), changes.since)

    # -- data -------------------------------------------------------------------------------------
    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> SnapshotReader:
        sid = self._ebs_id(snap, disk)
        reader = SnapshotReader(
            self.s, sid, disk.capacity, name=f"ebs://{self.s.region}/{sid}", progress=progress
        )
        if planned is not None:
            try:
                reader.prefetch(planned)
            except BaseException:
                reader.close()
                raise
        return reader


def open_image_url(url: str, **options) -> SnapshotReader:
    """``ebs://REGION/SNAPSHOT_ID``: the snapshot's guest bytes as a raw image (a RangeReader
    with ``allocated()``), for ``hyperctl convert`` and ``hyperctl info``."""
    region, path = region_of(url, "ebs")
    sid = path.strip("/")
    if not SNAPSHOT_ID.fullmatch(sid):
        raise InvalidParameterError(
            f"ebs:// URL must be ebs://REGION/snap-... (got {printable(url)[:100]!r})"
        )
    settings = Settings.from_options(region, options, "ebs image")
    try:
        found = snapshots.lookup(settings, sid)
        if found is None:
            raise SourceError(f"EBS snapshot {sid} not found in {settings.region}")
        if found.get("State") != "completed":
            raise SourceError(f"EBS snapshot {sid} is {found.get('State')}, not completed")
        size = int(found.get("VolumeSize", 0)) * 1024**3
        return SnapshotReader(settings, sid, size)
    except BaseException:
        settings.close()
        raise


__all__ = ["AwsSource", "open_image_url"]
