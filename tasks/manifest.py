"""Manifests on the target: find the previous export (for incrementals), publish a new one."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hypersdk.errors import HyperSDKError
from hypersdk.manifest import ExportManifest
from providers import open_target
from tasks.common import io_task_options

MANIFEST_NAME = "manifest.json"


def manifest_key(vm: str, export_id: str) -> str:
    return f"{vm}/{export_id}/{MANIFEST_NAME}"


def list_exports(target, vm: str) -> list[str]:
    """Manifest keys of the VM's complete exports, oldest first (export ids sort by time)."""
    return sorted(o.key for o in target.list(f"{vm}/") if o.key.endswith(f"/{MANIFEST_NAME}"))


@task(name="find-previous-export", cache_policy=NO_CACHE, **io_task_options(2))
def find_previous_export(target_url: str, vm: str) -> list[ExportManifest]:
    """The VM's export history on this target, newest first (unreadable manifests skipped)."""
    history = []
    with open_target(target_url) as target:
        for key in reversed(list_exports(target, vm)):
            try:
                history.append(ExportManifest.from_json(target.get_bytes(key)))
            except (HyperSDKError, ValueError):
                continue
    return history


@task(name="publish-manifest", cache_policy=NO_CACHE, **io_task_options(3))
def publish_manifest(target_url: str, manifest: ExportManifest) -> str:
    key = manifest_key(manifest.vm.name, manifest.export_id)
    with open_target(target_url) as target:
        target.put_bytes(key, manifest.to_json())
        return target.location(key)
