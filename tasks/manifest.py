"""Manifests on the target: find the previous export (for incrementals), publish a new one."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hypersdk.manifest import ExportManifest
from hypersdk.repository import manifest_key
from hypersdk.repository.history import read_history
from providers import open_target
from tasks.common import io_task_options


@task(
    name="find-previous-export",
    task_run_name="find-previous-export",
    cache_policy=NO_CACHE,
    **io_task_options(2),
)
def find_previous_export(target_url: str, vm: str) -> list[ExportManifest]:
    """The VM's export history on this target, newest first. A manifest that cannot be read
    is an error naming it, never skipped: skipping would silently move a delta's base."""
    with open_target(target_url) as target:
        history = read_history(target, vm)
    if history:
        get_run_logger().info(
            "%d previous export(s) of %r on %s, newest %s (%s)",
            len(history),
            vm,
            target_url,
            history[0].export_id,
            history[0].kind,
        )
    return history


@task(
    name="publish-manifest",
    task_run_name="publish-manifest",
    cache_policy=NO_CACHE,
    **io_task_options(3),
)
def publish_manifest(target_url: str, manifest: ExportManifest) -> str:
    key = manifest_key(manifest.vm.name, manifest.export_id)
    with open_target(target_url) as target:
        target.put_bytes(key, manifest.to_json())
        return target.location(key)
