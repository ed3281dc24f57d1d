"""EBS snapshots of an instance: taken together, kept only while an export needs them.

``create`` asks ``CreateSnapshots`` for every EBS volume of the instance at once (one
crash-consistent point across volumes), tagged with what made them and for which run, and waits
for them with a bounded waiter; if anything fails, what it created is deleted.

Which snapshots stay: a disk's change id is its EBS snapshot id, so the next incremental needs
the snapshot of the last published export. ``commit`` (the ChangeTracker's, called once a disk's
export is stored on the target) tags the disk's snapshot ``hypersdk:state=kept`` and names the
base it was a delta on. ``remove`` (always called when the run ends) then keeps the run's
snapshots only if every disk of the run was committed, together with their bases (so a run whose
manifest did not get published still leaves the previous point's base in place); any other end
deletes every snapshot of the run. A successful run also deletes older snapshots this tool made
for the instance: kept ones beyond ``keep_snapshots`` (and not a base), and unfinished ones
(a killed run's) older than STALE_SECONDS.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

from hypersdk.errors import HyperSDKError, SnapshotError, SourceError
from hypersdk.models import Snapshot, SnapshotDisk
from providers.aws.client import Settings, aws_errors, error_code
from providers.aws.inventory import GiB, Inventory

log = logging.getLogger(__name__)

TAG_RUN = "hypersdk:run"
TAG_INSTANCE = "hypersdk:instance"
TAG_STATE = "hypersdk:state"  # pending (being exported) or kept (an export of it is stored)
TAG_BASE = "hypersdk:base"  # the snapshot a kept one was a delta on
TAG_MADE_BY = "hypersdk:made-by"
STALE_SECONDS = 48 * 3600  # an unfinished run's snapshot older than this is a killed run's


def _tags(snap: dict) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in snap.get("Tags") or []}


def create(settings: Settings, inv: Inventory, vm: str) -> Snapshot:
    inst = inv.find(vm)
    info = inv.describe(inst)
    if not info.disks:
        raise SnapshotError(f"EC2 instance {info.id} ({info.name}) has no EBS volume to export")
    run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    tags = [
        {"Key": TAG_RUN, "Value": run},
        {"Key": TAG_INSTANCE, "Value": info.id},
        {"Key": TAG_STATE, "Value": "pending"},
        {"Key": TAG_MADE_BY, "Value": "hypersdk export: deleted when no export needs it"},
    ]
    ec2 = settings.client("ec2")
    created: list[str] = []
    try:
        with aws_errors(f"EC2 CreateSnapshots of {info.id}"):
            answer = ec2.create_snapshots(
                InstanceSpecification={"InstanceId": info.id, "ExcludeBootVolume": False},
                Description=f"hypersdk export {run} of {info.name}",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}],
            )
        snaps = answer.get("Snapshots", [])
        created = [s["SnapshotId"] for s in snaps]
        _wait(settings, created)
        by_volume = {s["VolumeId"]: s for s in snaps}
        disks = []
        ids: dict[str, str] = {}
        for d in info.disks:
            s = by_volume.get(d.key or "")
            if s is None:
                raise SnapshotError(
                    f"CreateSnapshots of {info.id} made no snapshot of {d.key} ({d.controller})"
                )
            size = int(s.get("VolumeSize", 0)) * GiB or d.capacity
            disk = d.model_copy(update={"capacity": size})
            disks.append(SnapshotDisk(disk=disk, change_id=s["SnapshotId"]))
            ids[d.name] = s["SnapshotId"]
    except BaseException as exc:
        _delete_run(settings, info.id, run, created)
        if isinstance(exc, HyperSDKError) and (exc.retryable or not isinstance(exc, SourceError)):
            raise  # credentials, an unreachable endpoint, throttling: their own types
        if isinstance(exc, SnapshotError) or not isinstance(exc, Exception):
            raise
        raise SnapshotError(
            f"cannot snapshot EC2 instance {info.id} ({info.name}): {exc}"
        ) from None
    return Snapshot(
        id=run,
        vm=info.model_copy(update={"disks": [sd.disk for sd in disks]}),
        disks=disks,
        consistency="stopped" if info.power_state == "poweredOff" else "crash-consistent",
        provider_data={"region": settings.region, "instance": info.id, "run": run, "ebs": ids},
    )


def _wait(settings: Settings, ids: list[str]) -> None:
    """Until every snapshot is ``completed``, at most ``snapshot_timeout`` seconds."""
    from botocore.exceptions import WaiterError

    if not ids:
        return
    delay = max(1, min(15, int(settings.snapshot_timeout // 40) or 1))
    attempts = max(1, int(settings.snapshot_timeout // delay))
    waiter = settings.client("ec2").get_waiter("snapshot_completed")
    try:
        with aws_errors(f"EC2 DescribeSnapshots {', '.join(ids)}"):
            waiter.wait(SnapshotIds=ids, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
    except WaiterError as exc:
        reason = "failed" if "terminal" in str(exc).lower() else "did not complete"
        raise SnapshotError(
            f"EBS snapshots {', '.join(ids)} {reason} within {settings.snapshot_timeout:.0f} s"
        ) from None


def describe(settings: Settings, **kwargs) -> list[dict]:
    found = []
    with aws_errors(f"EC2 DescribeSnapshots in {settings.region}"):
        paginator = settings.client("ec2").get_paginator("describe_snapshots")
        for page in paginator.paginate(OwnerIds=["self"], **kwargs):
            found.extend(page.get("Snapshots", []))
    return found


def of_instance(settings: Settings, instance: str, run: str | None = None) -> list[dict]:
    """The snapshots this tool made for ``instance`` (of one run, if ``run``)."""
    filters = [{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance]}]
    if run:
        filters.append({"Name": f"tag:{TAG_RUN}", "Values": [run]})
    return describe(settings, Filters=filters)


def lookup(settings: Settings, snapshot_id: str) -> dict | None:
    """One snapshot by id, or None if EC2 does not know it (deleted, never existed)."""
    try:
        found = describe(settings, SnapshotIds=[snapshot_id])
    except SourceError as exc:
        if "InvalidSnapshot" in str(exc):
            return None
        raise
    return found[0] if found else None


def delete(settings: Settings, snapshot_id: str) -> bool:
    """Delete one snapshot; False if it was gone already."""
    from botocore.exceptions import ClientError

    with aws_errors(f"EC2 DeleteSnapshot {snapshot_id}"):
        try:
            settings.client("ec2").delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc)[0].startswith("InvalidSnapshot.NotFound"):
                return False
            raise
    return True


def _delete_run(settings: Settings, instance: str, run: str, known: list[str]) -> None:
    """Best effort (the caller raises the cause): every snapshot of ``run``."""
    ids = set(known)
    with contextlib.suppress(Exception):
        ids.update(s["SnapshotId"] for s in of_instance(settings, instance, run))
    for sid in sorted(ids):
        try:
            delete(settings, sid)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete EBS snapshot %s of run %s: %s", sid, run, exc)


def commit(settings: Settings, snapshot_id: str, since: str | None) -> None:
    """An export of this snapshot is stored: it is the next incremental's base."""
    tags = [{"Key": TAG_STATE, "Value": "kept"}]
    if since:
        tags.append({"Key": TAG_BASE, "Value": since})
    with aws_errors(f"EC2 CreateTags {snapshot_id}"):
        settings.client("ec2").create_tags(Resources=[snapshot_id], Tags=tags)


def remove(settings: Settings, snap: Snapshot) -> None:
    """End of a run: keep a fully committed run's snapshots (and their bases), delete the rest
    of the run; after a kept run, prune older snapshots of the instance. Safe to call twice."""
    data = snap.provider_data
    instance, run = data.get("instance", ""), data.get("run", "")
    wanted = set((data.get("ebs") or {}).values())
    if not instance or not run:
        return
    ours = of_instance(settings, instance, run)
    kept = {s["SnapshotId"] for s in ours if _tags(s).get(TAG_STATE) == "kept"}
    if not wanted or kept != wanted:
        gone = sorted(wanted | {s["SnapshotId"] for s in ours})
        _delete_run(settings, instance, run, gone)
        log.info("EBS snapshots of run %s deleted: %s", run, ", ".join(gone) or "none")
        return
    bases = {_tags(s).get(TAG_BASE, "") for s in ours} - {""}
    _prune(settings, instance, run, keep=kept | bases)


def _started(s: dict) -> float:
    start = s.get("StartTime")
    if isinstance(start, datetime):
        return start.astimezone(UTC).timestamp()
    return time.time()


def _prune(settings: Settings, instance: str, run: str, keep: set[str]) -> None:
    """Delete what this tool made for ``instance`` that no export needs any more."""
    others = [s for s in of_instance(settings, instance) if s["SnapshotId"] not in keep]
    others.sort(key=_started, reverse=True)
    spare: dict[str, int] = {}  # older kept snapshots still allowed per volume
    now = time.time()
    for s in others:
        tags = _tags(s)
        if tags.get(TAG_RUN) == run:
            continue
        if tags.get(TAG_STATE) == "kept":
            vol = s.get("VolumeId", "")
            left = spare.get(vol, settings.keep_snapshots - 1)
            spare[vol] = left - 1
            if left > 0:
                continue
        elif now - _started(s) < STALE_SECONDS:
            continue  # another run's, maybe still going (an export into another repository)
        try:
            if delete(settings, s["SnapshotId"]):
                log.info(
                    "EBS snapshot %s of %s (no export needs it) deleted", s["SnapshotId"], instance
                )
        except HyperSDKError as exc:
            log.warning("could not delete EBS snapshot %s: %s", s["SnapshotId"], exc)
