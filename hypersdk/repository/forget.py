"""Forget points of a VM by a retention policy, keeping every kept point restorable.

The plan is restic's (hypersdk.repository.retention.plan); the order of work is
``chain_plan``'s: a kept delta whose parent goes is first rebased on a synthetic full, built
from the stored objects (never from the source: it may have changed since) and committed, object
then manifest, before anything is deleted; then forgotten points go newest first, each manifest
before its objects; last, the delta objects the synthetic fulls replaced. A crash between any
two steps leaves every committed point restorable (docs/repository.md, "Crash safety").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hypersdk.errors import VerificationError
from hypersdk.formats import extension_for
from hypersdk.manifest import DiskManifest, ExportManifest, ObjectRef
from hypersdk.pipeline import export_stream
from hypersdk.repository.chain import load_chain, open_point, point_manifest
from hypersdk.repository.cleanup import clean_abandoned
from hypersdk.repository.layout import disk_key, export_prefix, manifest_key, vm_prefix
from hypersdk.repository.locks import RepositoryLock, default_owner
from hypersdk.repository.restore import points
from hypersdk.repository.retention import (
    ChainPlan,
    Point,
    RetentionPlan,
    RetentionPolicy,
    StepAction,
    chain_plan,
    plan,
)

log = logging.getLogger(__name__)


@dataclass
class ForgetResult:
    plan: RetentionPlan
    chain: ChainPlan
    dry_run: bool
    done: list[str] = field(default_factory=list)  # the steps carried out, in order


def _parent_point(m: ExportManifest) -> str | None:
    """The point a point builds on: the parent of its delta disks (one point for all)."""
    parents = {d.parent.export_id for d in m.disks if d.parent is not None}
    if len(parents) > 1:
        raise VerificationError(
            f"point {m.export_id}: its disks build on different points ({', '.join(parents)})"
        )
    return parents.pop() if parents else None


def forget(
    target: Any,
    vm: str,
    policy: RetentionPolicy,
    encryption: Any | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    say: Callable[[str], None] = log.info,
    lock_wait: float = 300.0,
    owner: dict | None = None,
) -> ForgetResult:
    """Plan, and unless ``dry_run`` carry out, the forgetting of ``vm``'s points by ``policy``,
    holding the VM's repository lock while objects change. ``owner``: the lock's owner record
    (``default_owner("forget")`` when None; a flow adds its run id and slot lease)."""
    manifests, result = _plan(target, vm, policy, now, dry_run)
    if dry_run:
        return result
    who = owner or default_owner("forget")
    with RepositoryLock(target, vm_prefix(vm), who, wait=lock_wait) as lock:
        clean_abandoned(target, vm, lock, say=say)  # what killed runs left, first
        # planned again under the lock: a backup may have committed a point meanwhile
        manifests, result = _plan(target, vm, policy, now, dry_run)
        _carry_out(target, vm, result.chain, manifests, encryption, say, result)
    return result


def _plan(
    target: Any, vm: str, policy: RetentionPolicy, now: datetime | None, dry_run: bool
) -> tuple[dict[str, ExportManifest], ForgetResult]:
    """The VM's manifests by export id, and what the policy keeps and forgets among them."""
    manifests = {pid: point_manifest(target, vm, pid) for pid in points(target, vm)}
    if not manifests:
        raise VerificationError(f"no backups of VM {vm!r} on {target.url}")
    retention = plan([Point(pid, m.created) for pid, m in manifests.items()], policy, now)
    chain = chain_plan(retention, {pid: _parent_point(m) for pid, m in manifests.items()})
    return manifests, ForgetResult(retention, chain, dry_run)


def _carry_out(
    target: Any,
    vm: str,
    chain: ChainPlan,
    manifests: dict[str, ExportManifest],
    encryption: Any | None,
    say: Callable[[str], None],
    result: ForgetResult,
) -> None:
    rebased: dict[str, ExportManifest] = {}
    for step in chain.steps:
        pid = step.point
        if step.action is StepAction.WRITE_FULL:
            rebased[pid] = _synthetic_full(target, vm, manifests[pid], encryption, say)
        elif step.action is StepAction.COMMIT_FULL:
            target.put_bytes(manifest_key(vm, pid), rebased[pid].to_json())
            say(f"point {pid}: rebased on its own synthetic full")
        elif step.action is StepAction.DELETE_MANIFEST:
            target.delete(manifest_key(vm, pid))
        elif step.action is StepAction.DELETE_OBJECTS:
            for obj in list(target.list(export_prefix(vm, pid))):
                target.delete(obj.key)
            say(f"point {pid}: forgotten")
        elif step.action is StepAction.DELETE_SUPERSEDED:
            for d in rebased[pid].disks:
                if d.replaces is not None:
                    target.delete(d.replaces.key)
        result.done.append(str(step))


def _synthetic_full(
    target: Any,
    vm: str,
    manifest: ExportManifest,
    encryption: Any | None,
    say: Callable[[str], None],
) -> ExportManifest:
    """The point's manifest with each delta disk replaced by a full image of its guest bytes,
    written (committed, not yet named by any manifest) from its stored chain."""
    disks = []
    for d in manifest.disks:
        if d.kind != "delta":
            disks.append(d)
            continue
        if d.encryption and encryption is None:
            raise VerificationError(
                f"{d.key} is encrypted: give the key, rebasing it on a full needs to read it"
            )
        fmt = d.image_format or "qcow2"
        key = disk_key(vm, manifest.export_id, d.name, extension_for(fmt), bool(d.encryption))
        chain = load_chain(target, vm, manifest.export_id, d.name)
        with (
            open_point(target, chain, encryption) as image,
            target.open_writer(key) as writer,
        ):
            out = export_stream(
                image,
                image.extents(),
                full=True,
                fmt=fmt,
                out=writer,
                encryption=encryption if d.encryption else None,
            )
        say(f"point {manifest.export_id}: synthetic full of {d.name} written ({key})")
        disks.append(
            DiskManifest(
                name=d.name,
                kind="full",
                image_format=fmt,
                replaces=ObjectRef(key=d.key, object_blake3=d.object_blake3),
                virtual_size=out.virtual_size,
                format=fmt,
                key=key,
                object_size=out.object_size,
                object_blake3=out.object_blake3,
                change_id=d.change_id,
                data_bytes=out.data_bytes,
                defined_bytes=out.defined_bytes,
                chunks=out.chunks,
                chunk_size=out.chunk_size,
                encryption=out.encryption,
                note=f"synthetic full of a delta whose parent was forgotten ({d.key})",
            )
        )
    return manifest.model_copy(update={"disks": disks, "kind": "full"})
