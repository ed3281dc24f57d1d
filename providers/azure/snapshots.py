"""Incremental snapshots of a VM's managed disks, their read access, and their pruning.

Every snapshot we take is named ``hypersdk-<export id>-<slot>`` and tagged (``hypersdk``,
``hypersdk-vm``, ``hypersdk-slot``, ``hypersdk-disk`` = the source disk's resource id), so we
only ever touch our own. The newest one of a disk is the base of the next incremental (its
resource id is the change id the repository keeps): ``remove_snapshot`` revokes access and keeps
it; the next export of the VM prunes every other snapshot of ours of that disk, whatever run
left it (a failed or killed one included), keeping only the base that export diffs against.

Read access (``grant_access``: a SAS URL to the snapshot's page blob) is a credential: it is
asked for where it is used, held in memory only, and revoked in a ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator

from hypersdk.errors import HyperSDKError, SnapshotError
from providers.azure.connection import Settings, arm_errors

log = logging.getLogger(__name__)

PREFIX = "hypersdk-"
TAG = "hypersdk"
GRANT_SECONDS = 4 * 3600
_NAME = re.compile(r"^hypersdk-\d{8}T\d{6}Z-[0-9a-f]{8}-(os|lun\d{1,3})$")
_SNAP_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Compute/snapshots/(?P<name>[^/]+)$",
    re.I,
)


def new_export_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def snapshot_name(export_id: str, slot: str) -> str:
    return f"{PREFIX}{export_id}-{slot}"


def parse_change_id(change_id: str, settings: Settings) -> str | None:
    """The snapshot name a change id (a snapshot resource id of ours, in this subscription and
    resource group) names, or None if it is anything else (a hostile or foreign manifest)."""
    m = _SNAP_ID.match(change_id or "")
    if (
        not m
        or m["sub"].lower() != settings.subscription.lower()
        or m["rg"].lower() != settings.resource_group.lower()
        or not _NAME.match(m["name"])
    ):
        return None
    return m["name"]


def create(client, settings: Settings, vm_name: str, location: str, disks: list) -> dict:
    """An incremental snapshot of each (slot, disk id): {slot: snapshot resource}. Started
    together, awaited together; if any fails, those made are deleted and SnapshotError raised."""
    from azure.mgmt.compute.models import CreationData, Snapshot, SnapshotProperties

    export_id = new_export_id()
    rg = settings.resource_group
    pollers, made = {}, {}
    try:
        for slot, disk_id in disks:
            body = Snapshot(
                location=location,
                properties=SnapshotProperties(
                    creation_data=CreationData(create_option="Copy", source_resource_id=disk_id),
                    incremental=True,
                ),
                tags={
                    TAG: "export",
                    f"{TAG}-vm": vm_name,
                    f"{TAG}-slot": slot,
                    f"{TAG}-disk": disk_id.lower(),
                },
            )
            name = snapshot_name(export_id, slot)
            with arm_errors(settings, f"snapshot of disk {slot} of VM {vm_name!r}"):
                pollers[slot] = (name, client.snapshots.begin_create_or_update(rg, name, body))
        for slot, (_, poller) in pollers.items():
            with arm_errors(settings, f"snapshot of disk {slot} of VM {vm_name!r}"):
                made[slot] = poller.result()
    except BaseException as exc:
        for name, _ in pollers.values():
            delete(client, settings, name, quiet=True)
        if isinstance(exc, HyperSDKError) or not isinstance(exc, Exception):
            raise  # already one typed line (credentials, quota, unreachable...)
        raise SnapshotError(f"cannot snapshot VM {vm_name!r}: {exc}") from None
    return {"export_id": export_id, "snapshots": made}


def grant(client, settings: Settings, name: str, seconds: int = GRANT_SECONDS) -> str:
    """A read SAS URL of snapshot ``name`` (a credential: never log it)."""
    from azure.mgmt.compute.models import GrantAccessData

    with arm_errors(settings, f"read access to snapshot {name}"):
        poller = client.snapshots.begin_grant_access(
            settings.resource_group,
            name,
            GrantAccessData(access="Read", duration_in_seconds=seconds),
        )
        url = poller.result().access_sas
    if not url:
        raise SnapshotError(f"Azure granted no access URL for snapshot {name}")
    return url


def revoke(client, settings: Settings, name: str) -> None:
    """End read access to snapshot ``name``; a snapshot already gone is no error."""
    from azure.core.exceptions import ResourceNotFoundError

    with (
        arm_errors(settings, f"revoking access to snapshot {name}"),
        contextlib.suppress(ResourceNotFoundError),
    ):
        client.snapshots.begin_revoke_access(settings.resource_group, name).result()


@contextlib.contextmanager
def access(client, settings: Settings, name: str) -> Iterator[str]:
    """Read access to snapshot ``name`` for the block: always revoked afterwards."""
    url = grant(client, settings, name)
    try:
        yield url
    finally:
        revoke(client, settings, name)


def delete(client, settings: Settings, name: str, quiet: bool = False) -> None:
    """Delete snapshot ``name`` (its access revoked first: Azure refuses to delete a snapshot
    with an active SAS). Gone already is no error; ``quiet`` only logs failures."""
    try:
        revoke(client, settings, name)
        with arm_errors(settings, f"deleting snapshot {name}"):
            client.snapshots.begin_delete(settings.resource_group, name).result()
    except Exception as exc:
        if not quiet:
            raise
        log.warning("could not delete snapshot %s (delete it in Azure): %s", name, exc)


def get(client, settings: Settings, name: str):
    """Snapshot ``name``, or None if it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    with arm_errors(settings, f"snapshot {name}"):
        try:
            return client.snapshots.get(settings.resource_group, name)
        except ResourceNotFoundError:
            return None


def ours_of_disk(client, settings: Settings, disk_id: str) -> list[str]:
    """Names of our snapshots of the disk ``disk_id`` in the resource group."""
    out = []
    with arm_errors(settings, "listing snapshots"):
        for snap in client.snapshots.list_by_resource_group(settings.resource_group):
            tags = snap.tags or {}
            if (
                tags.get(TAG) == "export"
                and (tags.get(f"{TAG}-disk") or "").lower() == disk_id.lower()
                and _NAME.match(snap.name or "")
            ):
                out.append(snap.name)
    return sorted(out)


def prune(client, settings: Settings, disk_id: str, keep: set[str]) -> list[str]:
    """Delete our snapshots of ``disk_id`` not in ``keep`` (revoking any access a killed run
    left); returns the names deleted. Failures are logged, never fatal: the export goes on."""
    removed = []
    try:
        names = ours_of_disk(client, settings, disk_id)
    except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
        log.warning("could not list old snapshots of %s: %s", disk_id.rsplit("/", 1)[-1], exc)
        return removed
    for name in names:
        if name in keep:
            continue
        delete(client, settings, name, quiet=True)
        removed.append(name)
    return removed
