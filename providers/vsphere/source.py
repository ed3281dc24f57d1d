"""VSphereSource: the vSphere provider behind the Source interface.

URL forms::

    vsphere://vcenter.example.com                       every VM (pick one by name or moref)
    vsphere://vcenter.example.com:8443/DC1              the VMs of one datacenter
    vsphere://vcenter.example.com/DC1/vm/prod/web01     one VM by inventory path

Options (``open_source(url, **options)``): user, password, secret (Prefect Secret block name),
insecure, ca_file, workers (parallel range GETs per read, default 4), attempts (per broken range),
pooled (reuse the process-wide session, default True).
"""

from __future__ import annotations

import functools
import http.client
import logging
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    HyperSDKError,
    InvalidParameterError,
    SourceError,
)
from hypersdk.extents import ExtentMap
from hypersdk.models import DiskInfo, Snapshot, VMInfo
from hypersdk.options import reject_unknown_options
from providers.base import DiskChanges, Progress, Source
from providers.vsphere import cbt, snapshots
from providers.vsphere.connection import (
    DEFAULT_PORT,
    Credentials,
    Session,
    fault_message,
    get_session,
    refresh_session,
    resolve_credentials,
)
from providers.vsphere.download import DatastoreReader, folder_url, resolve_flat
from providers.vsphere.inventory import Inventory

log = logging.getLogger(__name__)

_OPTIONS = {"user", "password", "secret", "insecure", "ca_file", "workers", "attempts", "pooled"}


def _mapped(method):
    """Typed errors for failures below the provider: a dropped connection, an expired session.

    An expired session (vCenter drops idle ones, e.g. while a long download only uses the data
    path) is not an error: the call runs once more on a fresh login. That is what lets an export
    of many hours still remove its snapshot at the end. vSphere checks the session before it
    acts, so the refused call did nothing and is safe to repeat."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        from pyVmomi import vim, vmodl

        for attempt in (1, 2):
            try:
                return method(self, *args, **kwargs)
            except HyperSDKError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._session = None  # the next call checks the pooled session again
                raise EndpointUnreachableError(
                    f"lost the connection to vSphere at {self.url}: {exc or type(exc).__name__}"
                ) from None
            except vim.fault.NotAuthenticated:
                self._session = None  # the next access logs in again (a dead pooled one too)
                if attempt == 2:
                    raise CredentialsError(
                        f"vSphere at {self.url} refused a fresh session too: NotAuthenticated"
                    ) from None
                log.info("vSphere session at %s expired: logging in again", self.url)
            except vmodl.MethodFault as exc:
                raise SourceError(f"vSphere at {self.url}: {fault_message(exc)}") from None
        raise AssertionError("unreachable")

    return wrapper


class VSphereSource(Source):
    schemes = ("vsphere",)

    def __init__(
        self,
        creds: Credentials,
        path: str = "",
        *,
        workers: int = 4,
        attempts: int = 5,
        pooled: bool = True,
    ):
        if workers < 1 or attempts < 1:
            raise InvalidParameterError("workers and attempts must be at least 1")
        self.creds = creds
        self.path = path.strip("/")
        self.workers = workers
        self.attempts = attempts
        self.pooled = pooled
        self._session: Session | None = None

    @classmethod
    def from_url(cls, url: str, **options) -> VSphereSource:
        reject_unknown_options("vsphere source", options, _OPTIONS)
        parts = urlsplit(url)
        if parts.scheme.lower() != "vsphere":
            raise InvalidParameterError(f"not a vsphere:// URL: {parts.scheme}://...")
        try:
            port = parts.port
        except ValueError:
            raise InvalidParameterError("vsphere URL has an invalid port") from None
        insecure = options.get("insecure")
        if isinstance(insecure, str):
            insecure = insecure.strip().lower() in {"1", "true", "yes", "on"}
        creds = resolve_credentials(
            parts.hostname or "",
            port,
            user=options.get("user") or (unquote(parts.username) if parts.username else None),
            password=options.get("password")
            or (SecretStr(unquote(parts.password)) if parts.password else None),
            insecure=insecure,
            ca_file=options.get("ca_file"),
            secret=options.get("secret"),
        )
        return cls(
            creds,
            unquote(parts.path),
            workers=int(options.get("workers", 4)),
            attempts=int(options.get("attempts", 5)),
            pooled=bool(options.get("pooled", True)),
        )

    @property
    def url(self) -> str:
        port = "" if self.creds.port == DEFAULT_PORT else f":{self.creds.port}"
        return f"vsphere://{self.creds.host}{port}/{self.path}".rstrip("/")

    def __repr__(self) -> str:
        return f"VSphereSource({self.url!r}, user={self.creds.user!r})"

    # -- session ----------------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = get_session(self.creds, pooled=self.pooled)
        return self._session

    def _inventory(self) -> Inventory:
        return Inventory(self.session, self.path)

    def close(self) -> None:
        """Release this source. A pooled session stays logged in for the next task of this
        process (logged out at exit or by connection.logout_all()); an unpooled one logs out."""
        if self._session is not None and not self.pooled:
            self._session.logout()
        self._session = None

    # -- inventory --------------------------------------------------------------------------------
    @_mapped
    def list_vms(self) -> list[VMInfo]:
        return self._inventory().list_vms()

    @_mapped
    def get_vm(self, name: str) -> VMInfo:
        return self._inventory().find(name)[1]

    @_mapped
    def vm_ref(self, name: str):
        return self._inventory().find(name)[0]

    # -- snapshots --------------------------------------------------------------------------------
    @_mapped
    def create_snapshot(self, vm: str) -> Snapshot:
        ref, info = self._inventory().find(vm)
        return snapshots.create(self.session, ref, info)

    @_mapped
    def remove_snapshot(self, snap: Snapshot) -> None:
        snapshots.remove(self.session, snap)

    # -- CBT --------------------------------------------------------------------------------------
    @_mapped
    def enable_cbt(self, vm: str, stun: bool = True) -> bool:
        return cbt.enable(self.vm_ref(vm), stun=stun)

    @_mapped
    def cbt_status(self, vm: str) -> dict:
        return cbt.status(self.vm_ref(vm))

    @_mapped
    def changed_extents(
        self, snap: Snapshot, disk: DiskInfo, since: str | None, progress: Progress | None = None
    ) -> DiskChanges:
        from pyVmomi import vmodl

        try:
            return cbt.changed_extents(self.session, snap, disk, since)
        except vmodl.fault.ManagedObjectNotFound:
            raise SourceError(
                f"snapshot {snap.id} of VM {snap.vm.name!r} no longer exists on {self.url}"
            ) from None

    # -- data -------------------------------------------------------------------------------------
    def _snap_disk(self, snap: Snapshot, disk: DiskInfo) -> DiskInfo:
        for sd in snap.disks:
            if sd.disk.name == disk.name:
                return sd.disk
        raise SourceError(f"snapshot {snap.id} has no disk {disk.name!r}")

    @_mapped
    def open_disk(
        self,
        snap: Snapshot,
        disk: DiskInfo,
        planned: ExtentMap | None = None,
        progress: Progress | None = None,
    ) -> DatastoreReader:
        """Ranged HTTPS reads of the snapshot's (read-only, base) disk via the datastore; the
        workers fetch the ``planned`` extents ahead, in order."""
        sdisk = self._snap_disk(snap, disk)
        dc = snap.provider_data.get("datacenter")
        if not dc or not sdisk.backing:
            raise SourceError(f"disk {disk.name!r} of {snap.vm.name!r} has no datastore file")
        session = self.session
        client = session.http()
        ds, flat = resolve_flat(client, session.base_url, dc, sdisk.backing, session.cookie)
        holder = {"session": session}

        def cookie() -> str:
            return holder["session"].cookie

        def relogin() -> None:
            holder["session"] = refresh_session(holder["session"])

        reader = DatastoreReader(
            client,
            folder_url(session.base_url, dc, ds, flat),
            sdisk.capacity,
            name=f"{self.url}:[{ds}] {flat}",
            cookie=cookie,
            on_unauthorized=relogin,
            workers=self.workers,
            attempts=self.attempts,
            progress=progress,
        )
        if planned is not None:
            reader.prefetch(e for e in planned if not e.zero)
        return reader

    # -- OVA (snapshot based: works for running VMs) ------------------------------------------------
    @_mapped
    def export_ova(self, vm: str, dest, progress=None) -> dict:
        """Snapshot the VM and stream an OVA (OVF + manifest + streamOptimized VMDKs) to ``dest``.

        Built by hypersdk.formats.ova.write_ova from the snapshot's disks (allocated extents only);
        the file appears under its final name only when complete; the snapshot is always removed.
        """
        import contextlib

        from hypersdk.atomic import atomic_file
        from hypersdk.formats.ova import write_ova

        with self.snapshot(vm) as snap, contextlib.ExitStack() as stack:
            disks = []
            for sd in snap.disks:
                changes = self.changed_extents(snap, sd.disk, None)
                reader = self.open_disk(snap, sd.disk, changes.extents)
                stack.callback(reader.close)
                disks.append((sd.disk, reader, changes.extents))
            with atomic_file(dest) as sink:
                size = write_ova(snap.vm, disks, sink, progress)
            fetched = sum(r.bytes_fetched for _, r, _ in disks)
        return {"ova": str(dest), "size": size, "bytes_fetched": fetched, "snapshot": snap.id}

    # -- OVF --------------------------------------------------------------------------------------
    @_mapped
    def export_ovf(self, vm: str, dest, keepalive: float = 60.0, progress=None) -> dict:
        """ExportVm of a powered-off VM into ``dest`` (OVF descriptor, disks, SHA-256 manifest)."""
        from providers.vsphere.nfc import export_ovf

        return export_ovf(
            self.session,
            self.vm_ref(vm),
            dest,
            workers=self.workers,
            keepalive=keepalive,
            progress=progress,
        )


__all__ = ["VSphereSource"]
