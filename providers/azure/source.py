"""AzureSource: the VMs of one resource group, exported through incremental disk snapshots.

URL: ``azure://SUBSCRIPTION-ID/RESOURCE_GROUP`` with options (in the query or as keywords):
management_url (default https://management.azure.com), ca_file (PEM bundle to trust for it),
authority (Entra ID host), client_id (a user-assigned managed identity), workers (parallel
ranged GETs per disk, default 4), attempts (per broken range, default 5), keep_snapshot (keep
each disk's newest snapshot as the next incremental's base, default true), poll_interval
(seconds between polls of a long-running operation when Azure gives no Retry-After, default 2).
Credentials only ever come from DefaultAzureCredential. See docs/azure.md.
"""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import unquote, urlsplit

from hypersdk.errors import InvalidParameterError, SnapshotError, SourceError
from hypersdk.extents import ExtentMap
from hypersdk.models import DiskInfo, Snapshot, SnapshotDisk, VMInfo
from hypersdk.options import reject_unknown_options
from providers.azure import pages, snapshots
from providers.azure.connection import _GUID, Settings, _arm_code, arm_errors, compute_client
from providers.azure.inventory import _get, disk_refs, vm_info
from providers.base import DiskChanges, Progress, Source

log = logging.getLogger(__name__)

_OPTIONS = {
    "management_url",
    "ca_file",
    "authority",
    "client_id",
    "workers",
    "attempts",
    "keep_snapshot",
    "poll_interval",
}


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


class AzureSource(Source):
    schemes = ("azure",)

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 4,
        attempts: int = 5,
        keep_snapshot: bool = True,
    ):
        if workers < 1 or attempts < 1:
            raise InvalidParameterError("workers and attempts must be at least 1")
        self.settings = settings
        self.workers, self.attempts, self.keep_snapshot = workers, attempts, keep_snapshot
        self._client = None
        self._credential = None
        self._http = None

    @classmethod
    def from_url(cls, url: str, **options) -> AzureSource:
        reject_unknown_options("azure source", options, _OPTIONS)
        parts = urlsplit(url)
        if parts.scheme.lower() != "azure" or parts.username or parts.password:
            raise InvalidParameterError("expected azure://SUBSCRIPTION-ID/RESOURCE_GROUP")
        path = [unquote(p) for p in parts.path.split("/") if p]
        if len(path) != 1:
            raise InvalidParameterError(
                "azure source URL must be azure://SUBSCRIPTION-ID/RESOURCE_GROUP"
            )
        settings = Settings(
            subscription=unquote(parts.netloc),
            resource_group=path[0],
            management_url=str(options.get("management_url") or "https://management.azure.com"),
            ca_file=str(options["ca_file"]) if options.get("ca_file") else None,
            authority=str(options["authority"]) if options.get("authority") else None,
            client_id=str(options["client_id"]) if options.get("client_id") else None,
            poll_interval=float(options.get("poll_interval", 2.0)),
        )
        return cls(
            settings,
            workers=int(options.get("workers", 4)),
            attempts=int(options.get("attempts", 5)),
            keep_snapshot=_flag(options.get("keep_snapshot", True)),
        )

    @property
    def url(self) -> str:
        return f"azure://{self.settings.subscription}/{self.settings.resource_group}"

    def __repr__(self) -> str:
        return f"AzureSource({self.url!r})"

    @property
    def client(self):
        if self._client is None:
            self._client, self._credential = compute_client(self.settings)
        return self._client

    def close(self) -> None:
        for thing in (self._http, self._client, self._credential):
            if thing is not None:
                with contextlib.suppress(Exception):  # closing is best effort
                    thing.close()
        self._client = self._credential = self._http = None

    # -- inventory ------------------------------------------------------------------------------
    def _sizes(self, location: str) -> dict[str, tuple[int, int]]:
        with arm_errors(self.settings, f"VM sizes of {location}"):
            return {
                s.name: (s.number_of_cores or 1, s.memory_in_mb or 1024)
                for s in self.client.virtual_machine_sizes.list(location)
            }

    def _disks(self, vms) -> dict[str, object]:
        out = {}
        for vm in vms:
            for ref in disk_refs(vm):
                if ref.id.lower() not in out:
                    with arm_errors(self.settings, f"disk {ref.name}"):
                        out[ref.id.lower()] = self.client.disks.get(ref.resource_group, ref.name)
        return out

    def _infos(self, vms) -> list[VMInfo]:
        sizes: dict[str, dict] = {}
        for vm in vms:
            if vm.location not in sizes:
                sizes[vm.location] = self._sizes(vm.location)
        disks = self._disks(vms)
        return [vm_info(vm, disks, sizes[vm.location]) for vm in vms]

    def list_vms(self) -> list[VMInfo]:
        with arm_errors(self.settings, "listing VMs"):
            vms = list(
                self.client.virtual_machines.list(
                    self.settings.resource_group, expand="instanceView"
                )
            )
        return self._infos(vms)

    def _vm(self, name: str):
        from azure.core.exceptions import ResourceNotFoundError

        rg = self.settings.resource_group
        with arm_errors(self.settings, f"VM {name!r}", vm=name):
            try:
                return self.client.virtual_machines.get(rg, name, expand="instanceView")
            except ResourceNotFoundError as exc:
                if _arm_code(exc) != "ResourceNotFound" or not _GUID.match(name):
                    raise
                for vm in self.client.virtual_machines.list(rg, expand="instanceView"):
                    if (_get(vm, "properties", "vm_id") or "").lower() == name.lower():
                        return vm  # a vmId, found by listing
                raise

    def get_vm(self, name: str) -> VMInfo:
        if not name or "/" in name:
            raise InvalidParameterError(f"not an Azure VM name: {name[:100]!r}")
        return self._infos([self._vm(name)])[0]

    def preflight(self, vm: VMInfo) -> None:
        """The VM's disks are managed disks we can describe (done by get_vm already)."""

    # -- snapshots --------------------------------------------------------------------------------
    def create_snapshot(self, vm: str) -> Snapshot:
        raw = self._vm(vm)
        info = self._infos([raw])[0]
        refs = disk_refs(raw)
        made = snapshots.create(
            self.client, self.settings, info.name, raw.location, [(r.slot, r.id) for r in refs]
        )
        names = {slot: s.name for slot, s in made["snapshots"].items()}
        return Snapshot(
            id=made["export_id"],
            vm=info,
            disks=[
                SnapshotDisk(disk=d, change_id=made["snapshots"][d.name].id) for d in info.disks
            ],
            consistency="stopped" if info.power_state == "poweredOff" else "crash-consistent",
            provider_data={
                "subscription": self.settings.subscription,
                "resource_group": self.settings.resource_group,
                "snapshots": names,
                "disk_ids": {r.slot: r.id for r in refs},
            },
        )

    def _snap_name(self, snap: Snapshot, disk: DiskInfo) -> str:
        name = (snap.provider_data.get("snapshots") or {}).get(disk.name)
        if not name or not snapshots._NAME.match(name):
            raise SnapshotError(f"snapshot {snap.id} has no disk {disk.name!r}")
        return name

    def _check_same_place(self, snap: Snapshot) -> None:
        data = snap.provider_data
        if (data.get("subscription"), data.get("resource_group")) != (
            self.settings.subscription,
            self.settings.resource_group,
        ):
            raise SnapshotError(f"snapshot {snap.id} was not taken on {self.url}")

    def remove_snapshot(self, snap: Snapshot) -> None:
        """Revoke every disk's access; keep each snapshot as the next incremental's base (or
        delete it with keep_snapshot=false). Safe twice, and from another process."""
        self._check_same_place(snap)
        failures = []
        for slot, name in (snap.provider_data.get("snapshots") or {}).items():
            if not snapshots._NAME.match(name or ""):
                continue
            try:
                if self.keep_snapshot:
                    snapshots.revoke(self.client, self.settings, name)
                else:
                    snapshots.delete(self.client, self.settings, name)
            except Exception as exc:  # noqa: BLE001 - try every disk, then report
                failures.append(f"{slot}: {exc}")
        if failures:
            raise SnapshotError(
                f"cleaning up snapshot {snap.id} of VM {snap.vm.name!r} failed "
                f"({'; '.join(failures)})"
            )

    # -- changed extents ------------------------------------------------------------------------
    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        self._check_same_place(snap)
        name = self._snap_name(snap, disk)
        sd = next(d for d in snap.disks if d.disk.name == disk.name)
        size = sd.disk.capacity
        disk_id = (snap.provider_data.get("disk_ids") or {}).get(disk.name) or sd.disk.key or ""
        base, note = self._base(since, disk_id) if since is not None else (None, "")
        keep = {name} | ({base} if base else set())
        removed = snapshots.prune(self.client, self.settings, disk_id, keep)
        if removed:
            log.info("%s: removed %d older snapshot(s) of ours", disk.name, len(removed))
        what = f"{self.url}: page ranges of snapshot {name}"
        with snapshots.access(self.client, self.settings, name) as sas:
            if base is not None:
                try:
                    with snapshots.access(self.client, self.settings, base) as prev_sas:
                        extents = pages.diff_pages(sas, prev_sas, size, what)
                    return DiskChanges(extents, sd.change_id, since)
                except SourceError as exc:
                    if isinstance(exc, SnapshotError):
                        raise
                    note = f"page-range diff against {base} failed ({exc}): full export instead"
                    log.warning("%s: %s", disk.name, note)
            extents = pages.all_pages(sas, size, what)
        if progress is not None:
            progress(size)
        return DiskChanges(extents, sd.change_id, None, note=note)

    def _base(self, since: str, disk_id: str) -> tuple[str | None, str]:
        """The previous snapshot to diff against, or None and why a full export instead."""
        name = snapshots.parse_change_id(since, self.settings)
        if name is None:
            return None, (
                f"change id {since[:120]!r} is not a snapshot of ours in {self.url}: full export"
            )
        prev = snapshots.get(self.client, self.settings, name)
        if prev is None:
            return None, f"previous snapshot {name} is gone: full export instead"
        source = _get(prev, "properties", "creation_data", "source_resource_id", default="")
        if source.lower() != disk_id.lower():
            return None, (
                f"previous snapshot {name} was taken of another disk "
                f"({source.rsplit('/', 1)[-1]}): full export instead"
            )
        return name, ""

    # -- data -------------------------------------------------------------------------------------
    def _http_client(self):
        import httpx

        if self._http is None:
            self._http = httpx.Client(
                timeout=httpx.Timeout(60.0, connect=10.0),
                limits=httpx.Limits(max_connections=4 * self.workers),
                follow_redirects=False,
            )
        return self._http

    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> pages.SnapshotReader:
        """Ranged GETs of the snapshot's page blob through a read SAS, revoked on close."""
        self._check_same_place(snap)
        name = self._snap_name(snap, disk)
        sd = next(d for d in snap.disks if d.disk.name == disk.name)
        sas = snapshots.grant(self.client, self.settings, name)
        reader = pages.SnapshotReader(
            self._http_client(),
            sas,
            sd.disk.capacity,
            name=f"{self.url}:{name}",
            on_close=lambda: snapshots.revoke(self.client, self.settings, name),
            workers=self.workers,
            attempts=self.attempts,
            progress=progress,
        )
        del sas
        if planned is not None:
            reader.prefetch(e for e in planned if not e.zero)
        return reader


__all__ = ["AzureSource"]
