"""The data path of one disk: download -> convert -> (encrypt) -> upload, one Prefect task each.

The four stages run at once over bounded in-memory streams (hypersdk.stages), so nothing is
staged on disk; each is a task of its own, so the flow graph shows every stage with its
duration, and its log line gives its bytes and throughput. A stream cannot resume half-way, so
retries are per disk: a transient failure (the error class says so) runs the disk again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed, wait

from hypersdk import cancel
from hypersdk.errors import HyperSDKError
from hypersdk.formats import get_driver
from hypersdk.manifest import DiskManifest, ParentLink
from hypersdk.models import DiskInfo, Snapshot
from hypersdk.pipeline import ExportStream, StreamResult, export_ova_stream, export_stream
from hypersdk.stages import StageStats
from hypersdk.units import human
from providers import open_source, open_target
from providers.base import DiskChanges
from tasks.common import RETRY_DELAYS, is_transient, stage_progress

DISK_ATTEMPTS = 3  # a disk's stream is run again after a transient failure, up to this often
STOP_WAIT = 10.0  # seconds a stopped run waits for its stages (each stops within one block)

_STAGE_DOCS = {
    "download": "Read the planned extents of the source disk (all reads of the stream).",
    "convert": "Write the target format from the downloaded data (the format writer).",
    "encrypt": "Seal the converted stream into the AES-256-GCM container (or GPG).",
    "upload": "Hash the stored bytes and write them to the target object.",
}


def _run_stage(stream: ExportStream, stage: str, disk: str) -> dict[str, float]:
    stats = stream.run_stage(stage)
    get_run_logger().info("%s", describe(stage, disk, stats))
    return stats.as_dict()


def describe(stage: str, disk: str, stats: StageStats) -> str:
    rate = f", {stats.mb_per_s:,.0f} MB/s" if stats.busy > 0.001 else ""
    return (
        f"{stage} of {disk}: {human(stats.bytes)} in {stats.wall:.2f} s "
        f"({stats.busy:.2f} s busy{rate})"
    )


def _stage_task(stage: str):
    def run(stream: ExportStream, disk: str) -> dict[str, float]:
        return _run_stage(stream, stage, disk)

    run.__name__ = stage
    run.__doc__ = _STAGE_DOCS[stage]
    return task(name=stage, task_run_name=f"{stage}-{{disk}}", cache_policy=NO_CACHE)(run)


STAGE_TASKS = {stage: _stage_task(stage) for stage in _STAGE_DOCS}


def run_stages_as_tasks(stream: ExportStream, disk: str) -> None:
    """Runner for hypersdk.pipeline: every stage as a Prefect task, all at once (the flow's
    task runner must have a thread for each). A stage task that ends without running (an
    orchestration failure) stops the others, so none waits forever."""
    futures = [STAGE_TASKS[name].submit(stream, disk) for name in stream.stage_names]
    try:
        for fut in as_completed(futures):
            outcome = fut.result(raise_on_failure=False)
            if isinstance(outcome, BaseException) and stream.failure is None:
                stream.abort(outcome)
            elif not isinstance(outcome, dict) and stream.failure is None:
                stream.abort(HyperSDKError(f"a stage task ended {fut.state.name}"))
    except BaseException as exc:  # SIGTERM or Ctrl-C in this (the main) thread: stop them all
        if cancel.is_stop(exc):
            cancel.request(f"{type(exc).__name__} while exporting {disk}")
        stream.abort(cancel.error() if cancel.requested() else exc)
        # the stages stop within a block; the writer is aborted only once none writes to it
        wait(futures, timeout=STOP_WAIT)
        raise
    if stream.failure is not None:
        raise stream.failure


def with_disk_retries(what: str, attempt: Callable[[], Any]) -> Any:
    """Run ``attempt`` again after a failure a retry can heal, with backoff; others raise."""
    delays = RETRY_DELAYS(DISK_ATTEMPTS - 1)
    for n in range(DISK_ATTEMPTS):
        try:
            return attempt()
        except Exception as exc:
            if n == DISK_ATTEMPTS - 1 or not is_transient(exc):
                raise
            delay = delays[n]
            get_run_logger().warning(
                "%s: attempt %d failed (%s): trying again in %d s", what, n + 1, exc, delay
            )
            if cancel.wait(delay):  # a stop request ends the wait, and the run
                raise cancel.error() from exc
    raise AssertionError("unreachable")


def delta_options(parent: ParentLink) -> dict[str, str]:
    """The HSDELTA writer's options: the parent it names (docs/repository.md)."""
    return {
        "parent_export_id": parent.export_id,
        "parent_disk": parent.disk,
        "parent_object_blake3": parent.object_blake3,
        "parent_virtual_size": str(parent.virtual_size),
    }


def export_disk(
    source_url: str,
    snap: Snapshot,
    disk: DiskInfo,
    changes: DiskChanges,
    target_url: str,
    key: str,
    fmt: str,
    format_options: Mapping[str, str] | None = None,
    parent: ParentLink | None = None,
    image_format: str | None = None,
    encryption: Any | None = None,
) -> tuple[DiskManifest, dict]:
    """Stream one disk into ``key`` on the target (a full image in ``fmt``, or an HSDELTA on
    ``parent``); nothing is visible there unless it all worked. Runs in the flow: the stages
    are its tasks."""
    options = get_driver(fmt).check_options(format_options)

    def attempt() -> StreamResult:
        with open_source(source_url) as source, open_target(target_url) as target:
            # a source that tracks changes by hashing the data records them from these reads
            tracker = source.change_tracker(snap, disk, changes)
            reader = source.open_disk(snap, disk, changes.extents)
            try:
                with (
                    stage_progress(
                        "export", changes.extents.data_bytes, f"Export of {disk.name}"
                    ) as progress,
                    target.open_writer(key) as writer,
                ):
                    result = export_stream(
                        reader,
                        changes.extents,
                        full=not changes.incremental,
                        fmt=fmt,
                        out=writer,
                        options=options,
                        encryption=encryption,
                        progress=progress,
                        observers=[tracker] if tracker else (),
                        runner=functools.partial(run_stages_as_tasks, disk=disk.name),
                    )
                    source.verify_snapshot(snap)  # before commit: never publish a disturbed view
            finally:
                reader.close()
            if tracker:  # the export is published: its change id becomes usable
                tracker.commit()
            return result

    result = with_disk_retries(f"export of {disk.name}", attempt)
    manifest = DiskManifest(
        name=disk.name,
        kind="delta" if parent else "full",
        parent=parent,
        image_format=image_format or fmt,
        virtual_size=result.virtual_size,
        format=fmt,
        format_options=options,
        key=key,
        object_size=result.object_size,
        object_blake3=result.object_blake3,
        change_id=changes.change_id,
        since_change_id=changes.since,
        data_bytes=result.data_bytes,
        defined_bytes=result.defined_bytes,
        chunks=result.chunks,
        chunk_size=result.chunk_size,
        encryption=result.encryption,
        note=changes.note,
    )
    return manifest, _stats(result)


def _stats(result: StreamResult) -> dict:
    """Per-stage figures for the summary (skipped bytes follow from the manifest)."""
    return {
        "wall_seconds": result.wall_seconds,
        "stages": {k: v.as_dict() for k, v in result.stages.items()},
    }


def export_package(
    source_url: str,
    snap: Snapshot,
    changes: dict[str, DiskChanges],
    target_url: str,
    key: str,
    format_options: Mapping[str, str] | None = None,
    encryption: Any | None = None,
) -> tuple[list[DiskManifest], dict]:
    """The whole VM as one OVA object: descriptor, manifest and every disk, in one stream
    whose stages are tasks, as for a disk."""
    disks = [sd.disk for sd in snap.disks]
    options = {  # "name" names a single-disk OVA in `hyperctl convert`; here the VM names it
        k: v for k, v in get_driver("ova").check_options(format_options).items() if k != "name"
    }

    def attempt():
        with open_source(source_url) as source, open_target(target_url) as target:
            readers = [source.open_disk(snap, d, changes[d.name].extents) for d in disks]
            total = sum(changes[d.name].extents.data_bytes for d in disks)
            try:
                with (
                    stage_progress("export", 2 * total, "OVA export (two passes)") as progress,
                    target.open_writer(key) as writer,
                ):
                    out = export_ova_stream(
                        snap.vm,
                        [
                            (d, r, changes[d.name].extents)
                            for d, r in zip(disks, readers, strict=True)
                        ],
                        writer,
                        options=options,
                        encryption=encryption,
                        progress=progress,
                        runner=functools.partial(run_stages_as_tasks, disk="ova"),
                    )
                    source.verify_snapshot(snap)
            finally:
                for r in readers:
                    r.close()
            for d in disks:  # change state for the next run (a package's reads are not observed)
                tracker = source.change_tracker(snap, d, changes[d.name])
                if tracker:
                    tracker.commit()
            return out

    packaged, result = with_disk_retries("OVA export", attempt)
    manifests = [
        DiskManifest(
            name=d.name,
            virtual_size=p.virtual_size,
            format="ova",
            format_options=dict(format_options or {}),
            key=key,
            member=p.member,
            object_size=result.object_size,
            object_blake3=result.object_blake3,
            change_id=changes[d.name].change_id,
            data_bytes=p.data_bytes,
            defined_bytes=p.virtual_size,
            chunks=p.chunks,
            chunk_size=p.chunk_size,
            encryption=result.encryption,
            note=changes[d.name].note,
        )
        for d, p in zip(disks, packaged, strict=True)
    ]
    return manifests, _stats(result)
