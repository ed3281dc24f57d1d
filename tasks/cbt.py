"""Changed-block tracking: which extents of a disk to move (all data, or what changed)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hypersdk.models import DiskInfo, Snapshot
from hypersdk.units import human
from providers import open_source
from providers.base import DiskChanges
from tasks.common import io_task_options, stage_progress


@task(
    name="cbt-diff",
    cache_policy=NO_CACHE,
    task_run_name="cbt-diff-{disk.name}",
    **io_task_options(2),
)
def changed_extents(
    source_url: str, snap: Snapshot, disk: DiskInfo, since: str | None
) -> DiskChanges:
    with (
        open_source(source_url) as source,
        stage_progress("cbt", disk.capacity or None, f"Change scan of {disk.name}") as progress,
    ):
        changes = source.changed_extents(snap, disk, since, progress)
    e = changes.extents
    how = f"changes since {since}" if changes.incremental else "all data (full export)"
    get_run_logger().info(
        "%s: %s: %d extents, %s to read of %s%s",
        disk.name,
        how,
        len(e),
        human(e.data_bytes),
        human(e.size),
        f" ({changes.note})" if changes.note else "",
    )
    return changes
