"""migrate_vm: export a VM from any source into any target, in any disk format.

Runs as plain Python (``migrate_vm(source=..., target=..., format="qcow2")``, ephemeral Prefect
API), from a deployment (prefect.yaml), or from ``hyperctl migrate``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.export import run_export
from hypersdk.requests import validate_request
from hypersdk.summary import MigrationResult


@flow(name="migrate-vm", log_prints=True, validate_parameters=True)
def migrate_vm(
    source: str | None = None,
    target: str | None = None,
    vm: str | None = None,
    format: str = "qcow2",
    format_options: dict[str, str] | None = None,
    incremental: bool = True,
    encryption: dict[str, Any] | None = None,
    verify: bool = True,
) -> MigrationResult:
    """Snapshot the VM, move what changed since the last export (or everything), convert,
    optionally encrypt, upload, write a manifest and verify it.

    source: source URL (default: the local provider's VM directory, $HYPERSDK_HOME/vms).
    target: target URL (default: $HYPERSDK_HOME/exports).
    encryption: a key *reference* (e.g. {"method": "keyfile", "path": "..."}), never a secret.
    """
    req = validate_request(
        source=source,
        target=target,
        vm=vm,
        format=format,
        format_options=format_options or {},
        incremental=incremental,
        encryption=encryption,
        verify=verify,
    )
    result = run_export(req)
    print(f"{result.kind} export of {result.vm}: {result.manifest}")
    return result


if __name__ == "__main__":
    migrate_vm()
