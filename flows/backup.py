"""backup_vm: the scheduled (nightly) backup: incremental into a backup target, with a full export
forced every ``full_every`` deltas so restore chains stay short."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.export import run_export
from hypersdk.requests import validate_request
from hypersdk.summary import MigrationResult


@flow(name="backup-vm", log_prints=True, validate_parameters=True)
def backup_vm(
    vm: str | None = None,
    source: str | None = None,
    target: str | None = None,
    format: str = "qcow2",
    full_every: int = 7,
    encryption: dict[str, Any] | None = None,
    verify: bool = True,
) -> MigrationResult:
    req = validate_request(
        source=source,
        target=target,
        vm=vm,
        format=format,
        incremental=True,
        full_every=full_every,
        encryption=encryption,
        verify=verify,
    )
    result = run_export(req)
    print(f"{result.kind} backup of {result.vm}: {result.manifest}")
    return result
