"""The export pipeline shared by migrate_vm and backup_vm, as the flow graph shows it:

    preflight -> find-previous-export -> snapshot -> per disk: cbt-diff, then the stream's
    stages download, convert, (encrypt), upload, all at once -> publish-manifest ->
    remove-snapshot -> verify-export

Disks are exported concurrently (bounded). The snapshot is always removed. Every step logs what
it did (which snapshot, which base and why, what was planned, each stage's throughput, what was
verified and cleaned up), so a run reads as a story in the UI whichever way it was started.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import Flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_UI_URL
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.callables import get_call_parameters

from flows.endpoint_slots import endpoint_slots
from flows.logs import route_engine_logs
from flows.ops_hooks import attach_ops_hooks
from flows.repo_slot import repository_slot
from flows.stopping import stoppable
from hypersdk import cancel
from hypersdk.formats import extension_for, get_driver
from hypersdk.manifest import DiskManifest, ExportManifest, ParentLink
from hypersdk.repository import (
    disk_key,
    manifest_key,
    package_key,
    vm_prefix,
)
from hypersdk.repository.cleanup import clean_abandoned
from hypersdk.repository.history import pick_base
from hypersdk.repository.locks import RepositoryLock, default_owner
from hypersdk.requests import ExportRequest, validate_request
from hypersdk.summary import DiskResult, MigrationResult, render_markdown
from hypersdk.units import human
from hypersdk.windows import check_window
from providers import open_target
from providers.preflight import preflight
from tasks.cbt import changed_extents
from tasks.common import io_task_options
from tasks.manifest import find_previous_export, publish_manifest
from tasks.snapshot import release_snapshot, take_snapshot
from tasks.transfer import delta_options, export_disk, export_package
from tasks.verify import verify

# Disks of one VM exported at once; each needs one task-runner thread per stage (up to four).
DISK_CONCURRENCY = 4
STAGE_THREADS = 4 * DISK_CONCURRENCY + 4
# How long an export waits for another export of the same VM into the same repository
LOCK_WAIT = 300.0


class ExportFlow(Flow):
    """A flow whose parameters are checked before a run exists, when called from Python:
    a wrong VM, an unreadable source, an unwritable target or an unknown format is one
    exception, at once, with no flow run created. (Deployment runs validate their typed
    parameters in the API and check the rest in the ``preflight`` task.)"""

    def __call__(self, *args: Any, **kwargs: Any):
        engine_options = {"return_state", "wait_for"}  # Flow.__call__'s own, not parameters
        call = {k: v for k, v in kwargs.items() if k not in engine_options}
        preflight(request_from(self.name, get_call_parameters(self.fn, args, call)))
        return super().__call__(*args, **kwargs)


def export_flow(name: str, doc: str) -> Callable[[Callable], ExportFlow]:
    """Decorator: ``fn`` as an ExportFlow with the task runner the stage tasks need."""

    def wrap(fn: Callable) -> ExportFlow:
        fn.__doc__ = doc
        route_engine_logs()
        flow = ExportFlow(
            fn=fn,
            name=name,
            log_prints=True,
            validate_parameters=True,
            task_runner=ThreadPoolTaskRunner(max_workers=STAGE_THREADS),
        )
        return attach_ops_hooks(flow)  # audit line and webhooks (flows/ops_hooks.py)

    return wrap


def request_from(flow_name: str, params: dict[str, Any]) -> ExportRequest:
    """The validated request behind a flow's parameters."""
    params = dict(params)
    # the run's time window says when, not what: checked here, enforced by flows/window.py
    check_window(params.pop("window", None))
    if flow_name == "backup-vm":
        params["incremental"] = True
    return validate_request(**params)


@task(name="preflight", task_run_name="preflight", cache_policy=NO_CACHE, **io_task_options(2))
def check_request(req: ExportRequest) -> str:
    """What can be checked without side effects: the VM exists, its disks can be read, the
    target can be written. Returns the VM's name."""
    vm = preflight(req)
    get_run_logger().info(
        "VM %r on %s: %d disk(s), %s; target %s",
        vm.name,
        req.source,
        len(vm.disks),
        human(sum(d.capacity for d in vm.disks)),
        req.target,
    )
    return vm.name


def _ui_url(flow_run_id: str | None) -> str | None:
    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


def _disk_result(dm: DiskManifest, stats: dict, target) -> DiskResult:
    return DiskResult(
        name=dm.name,
        key=dm.key,
        location=target.location(dm.key),
        format=dm.format,
        virtual_size=dm.virtual_size,
        data_bytes=dm.data_bytes,
        object_size=dm.object_size,
        skipped_bytes=dm.virtual_size - dm.data_bytes,
        incremental=dm.kind == "delta",
        base_key=dm.parent.key if dm.parent else None,
        note=dm.note,
        stages=stats["stages"],
    )


def _export_disk(req, snap, disk, vm_name, target, history) -> tuple[DiskManifest, DiskResult]:
    """One disk as one object: a full image, or an HSDELTA on the newest point."""
    logger = get_run_logger()
    base, why_full = pick_base(history, disk.name, req)
    if base is not None and not target.exists(base[1].key):
        base, why_full = None, f"previous export {base[1].key} is gone: full export"
    if base is not None:
        logger.info(
            "%s: delta on point %s (%s, change id %s)",
            disk.name,
            base[0].export_id,
            base[1].key,
            base[1].change_id or "none",
        )
    else:
        logger.info("%s: %s", disk.name, why_full)
    changes = changed_extents(req.source, snap, disk, base[1].change_id if base else None)
    note = "; ".join(n for n in (why_full if base is None else "", changes.note) if n)
    parent = None
    if base is not None and changes.incremental:
        parent = ParentLink(
            export_id=base[0].export_id,
            disk=disk.name,
            key=base[1].key,
            object_blake3=base[1].object_blake3,
            virtual_size=base[1].virtual_size,
        )
    fmt = "hsdelta" if parent else req.format
    key = disk_key(vm_name, snap.id, disk.name, extension_for(fmt), bool(req.encryption))
    dm, stats = export_disk(
        req.source,
        snap,
        disk,
        changes,
        req.target,
        key,
        fmt,
        delta_options(parent) if parent else req.format_options,
        parent,
        req.format,
        req.encryption,
    )
    dm.note = note
    logger.info(
        "%s: %s object %s, %s (%s of guest data, %s skipped)",
        disk.name,
        "delta" if parent else "full",
        key,
        human(dm.object_size),
        human(dm.data_bytes),
        human(dm.virtual_size - dm.data_bytes),
    )
    return dm, _disk_result(dm, stats, target)


def _export_disks(req, snap, vm_name, target, history) -> tuple[list, list]:
    """Every disk, up to DISK_CONCURRENCY at once (each on a thread carrying the run's
    context, so its tasks belong to this flow run), in the VM's disk order."""
    disks = [sd.disk for sd in snap.disks]
    if len(disks) == 1:
        outcomes = [_export_disk(req, snap, disks[0], vm_name, target, history)]
    else:
        with ThreadPoolExecutor(min(DISK_CONCURRENCY, len(disks)), "disk") as pool:
            futures = [
                pool.submit(
                    contextvars.copy_context().run,
                    _export_disk,
                    req,
                    snap,
                    d,
                    vm_name,
                    target,
                    history,
                )
                for d in disks
            ]
            outcomes = [f.result() for f in futures]
    return [m for m, _ in outcomes], [r for _, r in outcomes]


def _export_package(req, snap, vm_name, target) -> tuple[list, list]:
    """The whole VM as one OVA (always full: a package cannot hold a delta)."""
    changes = {sd.disk.name: changed_extents(req.source, snap, sd.disk, None) for sd in snap.disks}
    key = package_key(vm_name, snap.id, bool(req.encryption))
    dms, stats = export_package(
        req.source, snap, changes, req.target, key, req.format_options, req.encryption
    )
    results = [_disk_result(dm, stats, target) for dm in dms]
    for r in results[1:]:  # one object: count its bytes once
        r.object_size = 0
    return dms, results


def run_export(req: ExportRequest) -> MigrationResult:
    """Run the pipeline for one VM (called inside a flow). A stop (cancelled from the UI or the
    API, SIGTERM, Ctrl-C) ends it within seconds, cleaned up (flows/stopping.py)."""
    with stoppable("the export"):
        return _run_export(req)


def _run_export(req: ExportRequest) -> MigrationResult:
    logger = get_run_logger()
    started = time.perf_counter()
    vm_name = check_request(req)
    flow_run_id = runtime.flow_run.id
    # one export of a VM into one repository at a time: its history and the delta built on it
    # must not interleave with another's (a lock object on the target, docs/repository.md)
    with (
        open_target(req.target) as lock_target,
        # a second run of this VM into this repository waits here, in Prefect (flows/repo_slot)
        repository_slot(lock_target, vm_name) as slot_lease,
        RepositoryLock(
            lock_target,
            vm_prefix(vm_name),
            # the slot's lease: a run finding this lock's holder dead frees its slot with it
            default_owner("export", str(flow_run_id) if flow_run_id else None)
            | {"slot_lease": slot_lease},
            wait=LOCK_WAIT,
        ) as lock,
    ):
        if lock.took_over is not None:
            logger.warning(
                "took over the repository lock of %s (%s)",
                lock.took_over.describe(time.time()),
                lock.takeover_reason,
            )
        # what killed runs left (unfinished uploads, objects no manifest names) goes first
        clean_abandoned(lock_target, vm_name, lock, say=logger.info)
        # at most N exports read this source / write this target at once (flows/endpoint_slots)
        with endpoint_slots(req.source, req.target, vm_name):
            manifest, disks, results, location = _locked_export(req, vm_name, started)
    cancel.leaves(
        f"export {manifest.export_id} of {vm_name} was published ({location}); "
        "its verification did not finish (hyperctl verify checks it)"
    )
    if req.verify:
        checked = verify(req.target, manifest_key(vm_name, manifest.export_id), req.encryption)
        logger.info(
            "verified: %d chunk hashes of %d disk(s) match the manifest", checked, len(disks)
        )
    result = MigrationResult(
        export_id=manifest.export_id,
        kind=manifest.kind,
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
        description=f"{manifest.kind} export of {vm_name}",
    )
    return result


def _locked_export(req: ExportRequest, vm_name: str, started: float):
    """Snapshot, disks, manifest, snapshot removed: the part that holds the repository lock."""
    logger = get_run_logger()
    history = find_previous_export(req.target, vm_name) if req.incremental else []
    snap = take_snapshot(req.source, vm_name)
    logger.info(
        "snapshot %s of %r: %s, %d disk(s)", snap.id, vm_name, snap.consistency, len(snap.disks)
    )
    try:
        with open_target(req.target) as target:
            if get_driver(req.format).kind == "package":
                disks, results = _export_package(req, snap, vm_name, target)
            else:
                disks, results = _export_disks(req, snap, vm_name, target, history)
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
        logger.info("manifest published: %s", location)
    finally:
        if cancel.requested():  # stopping: at once, no task run, no retries to wait for
            release_snapshot.fn(req.source, snap)
        else:
            release_snapshot(req.source, snap)
        logger.info("snapshot %s removed", snap.id)
    return manifest, disks, results, location


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "vm"
