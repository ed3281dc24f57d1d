"""The data path of one disk: download -> convert -> encrypt -> upload, as one stream.

These four steps are one task because they are one stream (no staging copy between them); the
result reports each stage's bytes and time, so the run shows where the time went.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from hypersdk.formats import get_driver
from hypersdk.manifest import DiskManifest
from hypersdk.models import DiskInfo, Snapshot
from hypersdk.pipeline import StreamResult, export_ova_stream, export_stream
from providers import open_source, open_target
from providers.base import DiskChanges
from tasks.common import io_task_options, stage_progress


def delta_options(
    fmt: str, key: str, base_key: str | None, options: Mapping[str, str] | None
) -> dict:
    """Format options for this export; a delta names its base relative to itself."""
    out = dict(options or {})
    if base_key is not None:
        out["backing_file"] = posixpath.relpath(base_key, posixpath.dirname(key))
        out["backing_format"] = fmt
    return get_driver(fmt).check_options(out)


@task(
    name="export-disk",
    cache_policy=NO_CACHE,
    task_run_name="export-{disk.name}",
    **io_task_options(3),
)
def export_disk(
    source_url: str,
    snap: Snapshot,
    disk: DiskInfo,
    changes: DiskChanges,
    target_url: str,
    key: str,
    fmt: str,
    format_options: Mapping[str, str] | None = None,
    base_key: str | None = None,
    encryption: Any | None = None,
) -> tuple[DiskManifest, dict]:
    """Stream one disk into ``key`` on the target; nothing is visible there unless it all worked."""
    options = delta_options(fmt, key, base_key, format_options)
    with open_source(source_url) as source, open_target(target_url) as target:
        reader = source.open_disk(snap, disk)
        progress = stage_progress("export", changes.extents.data_bytes, f"Export of {disk.name}")
        # a source that tracks changes by hashing the data records them from this export's reads
        tracker = source.change_tracker(snap, disk, changes)
        try:
            with target.open_writer(key) as writer:
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
                )
                source.verify_snapshot(snap)  # before commit: a disturbed view is never published
        finally:
            progress.close()
            reader.close()
        if tracker:  # the export is published: its change id becomes usable
            tracker.commit()
    manifest = DiskManifest(
        name=disk.name,
        virtual_size=result.virtual_size,
        format=fmt,
        format_options=options,
        key=key,
        object_size=result.object_size,
        object_blake3=result.object_blake3,
        base_key=base_key,
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
    """Per-stage timings for the summary (skipped bytes follow from the manifest)."""
    return {
        "wall_seconds": result.wall_seconds,
        "stages": {k: {"bytes": v.bytes, "seconds": v.seconds} for k, v in result.stages.items()},
    }


@task(
    name="export-package", cache_policy=NO_CACHE, task_run_name="export-ova", **io_task_options(3)
)
def export_package(
    source_url: str,
    snap: Snapshot,
    changes: dict[str, DiskChanges],
    target_url: str,
    key: str,
    format_options: Mapping[str, str] | None = None,
    encryption: Any | None = None,
) -> tuple[list[DiskManifest], dict]:
    """The whole VM as one OVA object: descriptor, manifest and every disk, in one stream."""
    disks = [sd.disk for sd in snap.disks]
    with open_source(source_url) as source, open_target(target_url) as target:
        readers = [source.open_disk(snap, d) for d in disks]
        total = sum(changes[d.name].extents.data_bytes for d in disks)
        progress = stage_progress("export", 2 * total, "OVA export (two passes)")
        try:
            with target.open_writer(key) as writer:
                packaged, result = export_ova_stream(
                    snap.vm,
                    [(d, r, changes[d.name].extents) for d, r in zip(disks, readers, strict=True)],
                    writer,
                    # "name" names a single-disk OVA in `hyperctl convert`; here the VM names it
                    options={
                        k: v
                        for k, v in get_driver("ova").check_options(format_options).items()
                        if k != "name"
                    },
                    encryption=encryption,
                    progress=progress,
                )
                source.verify_snapshot(snap)
        finally:
            progress.close()
            for r in readers:
                r.close()
        for d in disks:  # change state for the next run (a package's reads are not observed)
            tracker = source.change_tracker(snap, d, changes[d.name])
            if tracker:
                tracker.commit()
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
