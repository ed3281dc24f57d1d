"""migrate_vm: export a VM from any source into any target, in any disk format.

Runs as plain Python (``migrate_vm(vm="web01", target="s3://...", format="qcow2")``), from a
deployment (prefect.yaml, the UI's run form), or from ``hyperctl migrate``.
"""

from __future__ import annotations

from flows.export import export_flow, request_from, run_export
from flows.params import (
    PARAMETER_DOCS,
    EncryptionRef,
    FormatName,
    FormatOptions,
    SourceUrl,
    TargetUrl,
    TimeWindow,
    VmName,
)
from flows.window import wait_for_window
from hypersdk.summary import MigrationResult

DOC = (
    """Snapshot the VM, move what changed since the last export (or everything), convert,
    optionally encrypt, upload, write a manifest and verify it.

    Args:"""
    + PARAMETER_DOCS
    + """        incremental: Build on the previous export of this VM on the target when the
            format allows it (a delta); off: a full export.
"""
)


@export_flow("migrate-vm", DOC)
def migrate_vm(
    vm: VmName,
    source: SourceUrl = None,
    target: TargetUrl = None,
    format: FormatName = "qcow2",
    format_options: FormatOptions | None = None,
    incremental: bool = True,
    encryption: EncryptionRef = None,
    verify: bool = True,
    window: TimeWindow = None,
) -> MigrationResult:
    wait_for_window(window)  # outside it: rescheduled to its opening, or waits (flows/window)
    req = request_from("migrate-vm", locals())
    result = run_export(req)
    print(f"{result.kind} export of {result.vm}: {result.manifest}")
    return result


if __name__ == "__main__":
    import sys

    migrate_vm(vm=sys.argv[1] if len(sys.argv) > 1 else "demo-vm")
