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
from hypersdk.pipeline import export_stream
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
                )
                source.verify_snapshot(snap)  # before commit: a disturbed view is never published
        finally:
            progress.close()
            reader.close()
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
        encryption=result.encryption,
        note=changes.note,
    )
    stats = {
        "wall_seconds": result.wall_seconds,
        "skipped_bytes": result.skipped_bytes,
        "stages": {k: {"bytes": v.bytes, "seconds": v.seconds} for k, v in result.stages.items()},
    }
    return manifest, stats
