"""Verify task: re-read an export and compare it with its manifest."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from hypersdk.verify import verify_export
from providers import open_target
from tasks.common import io_task_options


@task(
    name="verify-export", task_run_name="verify-export", cache_policy=NO_CACHE, **io_task_options(2)
)
def verify(target_url: str, manifest_key: str, encryption: Any | None = None) -> int:
    """Returns the number of chunks checked; raises VerificationError on any mismatch."""
    with open_target(target_url) as target:
        return sum(v.chunks_checked for v in verify_export(target, manifest_key, encryption))
