"""Snapshot tasks: take a point-in-time view of a VM, and always drop it afterwards."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hypersdk.models import Snapshot
from providers import open_source
from tasks.common import io_task_options


@task(name="snapshot", task_run_name="snapshot", cache_policy=NO_CACHE, **io_task_options(2))
def take_snapshot(source_url: str, vm: str) -> Snapshot:
    with open_source(source_url) as source:
        return source.create_snapshot(vm)


@task(
    name="remove-snapshot",
    task_run_name="remove-snapshot",
    cache_policy=NO_CACHE,
    **io_task_options(3),
)
def release_snapshot(source_url: str, snap: Snapshot) -> None:
    with open_source(source_url) as source:
        source.remove_snapshot(snap)
