"""The export pipeline shared by migrate_vm and backup_vm: snapshot -> CBT diff -> download ->
convert -> encrypt -> upload -> manifest -> verify, with the snapshot always removed."""

from __future__ import annotations

import time

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_UI_URL

from hypersdk.errors import InvalidParameterError
from hypersdk.formats import extension_for, get_driver
from hypersdk.manifest import DiskManifest, ExportManifest
from hypersdk.requests import ExportRequest
from hypersdk.summary import DiskResult, MigrationResult, render_markdown
from providers import open_source, open_target
from tasks.cbt import changed_extents
from tasks.common import io_task_options
from tasks.manifest import find_previous_export, manifest_key, publish_manifest
from tasks.snapshot import release_snapshot, take_snapshot
from tasks.transfer import export_disk, export_package
from tasks.verify import verify


@task(name="resolve-vm", cache_policy=NO_CACHE, **io_task_options(2))
def resolve_vm(source_url: str, vm: str | None) -> str:
    """The VM's name; without one, the source must hold exactly one VM."""
    with open_source(source_url) as source:
        if vm is not None:
            return source.get_vm(vm).name
        vms = source.list_vms()
        if len(vms) != 1:
            names = ", ".join(v.name for v in vms[:10]) or "none"
            raise InvalidParameterError(
                f"{source.url} holds {len(vms)} VMs ({names}): pass vm=NAME"
            )
        return vms[0].name


def pick_base(
    history: list[ExportManifest], disk: str, req: ExportRequest
) -> tuple[DiskManifest | None, str]:
    """The previous export of ``disk`` a delta can build on, or None and the reason why not."""
    if not req.incremental or not history:
        return None, ""
    if not get_driver(req.format).supports_backing:
        return None, f"format {req.format} cannot hold a delta: full export"
    if req.encryption is not None:
        # A delta names its base by path, and an encrypted base can't be opened as a backing
        # file: encrypted exports stay full until backup chains restore through our own reader.
        return None, "encrypted exports are always full: full export"
    newest = next((d for m in history for d in m.disks if d.name == disk), None)
    if newest is None:
        return None, ""
    if newest.format != req.format or bool(newest.encryption) != (req.encryption is not None):
        return None, "previous export used another format or encryption: full export"
    if req.full_every is not None:
        deltas = 0
        for manifest in history:  # newest first, back to the last full export
            if manifest.kind != "incremental":
                break
            deltas += 1
        if deltas >= req.full_every:
            return (
                None,
                f"{deltas} deltas since the last full (full_every={req.full_every}): full export",
            )
    return newest, ""


def _ui_url(flow_run_id: str | None) -> str | None:
    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


def _disk_result(dm: DiskManifest, stats: dict, target, incremental: bool) -> DiskResult:
    return DiskResult(
        name=dm.name,
        key=dm.key,
        location=target.location(dm.key),
        format=dm.format,
        virtual_size=dm.virtual_size,
        data_bytes=dm.data_bytes,
        object_size=dm.object_size,
        skipped_bytes=dm.virtual_size - dm.data_bytes,
        incremental=incremental,
        base_key=dm.base_key,
        note=dm.note,
        stages=stats["stages"],
    )


def _export_disk(req, snap, disk, vm_name, target, history, manifests) -> DiskResult:
    """One disk as one object: a full image, or a delta on the previous export."""
    logger = get_run_logger()
    base, why_full = pick_base(history, disk.name, req)
    if base is not None and not target.exists(base.key):
        base, why_full = None, f"previous export {base.key} is gone: full export"
    changes = changed_extents(req.source, snap, disk, base.change_id if base else None)
    note = "; ".join(n for n in (why_full, changes.note) if n)
    if note:
        logger.info("%s: %s", disk.name, note)
    base_key = base.key if base is not None and changes.incremental else None
    suffix = ".hsenc" if req.encryption is not None else ""
    key = f"{vm_name}/{snap.id}/{disk.name}{extension_for(req.format)}{suffix}"
    dm, stats = export_disk(
        req.source,
        snap,
        disk,
        changes,
        req.target,
        key,
        req.format,
        req.format_options,
        base_key,
        req.encryption,
    )
    dm.note = note
    manifests.append(dm)
    return _disk_result(dm, stats, target, base_key is not None)


def _export_package(req, snap, vm_name, target, manifests) -> list[DiskResult]:
    """The whole VM as one OVA (always full: a package cannot hold a delta)."""
    changes = {sd.disk.name: changed_extents(req.source, snap, sd.disk, None) for sd in snap.disks}
    suffix = ".hsenc" if req.encryption is not None else ""
    key = f"{vm_name}/{snap.id}/{vm_name}.ova{suffix}"
    dms, stats = export_package(
        req.source, snap, changes, req.target, key, req.format_options, req.encryption
    )
    manifests.extend(dms)
    results = [_disk_result(dm, stats, target, False) for dm in dms]
    for r in results[1:]:  # one object: count its bytes once
        r.object_size = 0
    return results


def run_export(req: ExportRequest) -> MigrationResult:
    """Run the pipeline for one VM (called inside a flow)."""
    started = time.perf_counter()
    vm_name = resolve_vm(req.source, req.vm)
    history = find_previous_export(req.target, vm_name) if req.incremental else []
    snap = take_snapshot(req.source, vm_name)
    disks: list[DiskManifest] = []
    try:
        with open_target(req.target) as target:
            if req.format == "ova":
                results = _export_package(req, snap, vm_name, target, disks)
            else:
                results = [
                    _export_disk(req, snap, sd.disk, vm_name, target, history, disks)
                    for sd in snap.disks
                ]
        kind = "incremental" if any(r.incremental for r in results) else "full"
        manifest = ExportManifest(
            export_id=snap.id,
            kind=kind,
            source=req.source,
            vm=snap.vm,
            snapshot_id=snap.id,
            snapshot_consistency=snap.consistency,
            disks=disks,
            stats={"seconds": time.perf_counter() - started},
        )
        location = publish_manifest(req.target, manifest)
    finally:
        release_snapshot(req.source, snap)
    if req.verify:
        verify(req.target, manifest_key(vm_name, snap.id), req.encryption)
    flow_run_id = runtime.flow_run.id
    result = MigrationResult(
        export_id=snap.id,
        kind=kind,
        vm=vm_name,
        source=req.source,
        target=req.target,
        manifest=location,
        encrypted=req.encryption is not None,
        verified=req.verify,
        seconds=time.perf_counter() - started,
        disks=results,
        flow_run_id=str(flow_run_id) if flow_run_id else None,
        ui_url=_ui_url(flow_run_id),
    )
    create_markdown_artifact(
        render_markdown(result),
        key=f"export-{_artifact_key(vm_name)}",
        description=f"{kind} export of {vm_name}",
    )
    return result


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "vm"
