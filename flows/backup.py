"""backup_vm: the scheduled (nightly) backup: incremental into a backup target, with a full
export forced every ``full_every`` deltas so restore chains stay short."""

from __future__ import annotations

from flows.export import export_flow, request_from, run_export
from flows.params import (
    PARAMETER_DOCS,
    EncryptionRef,
    FormatName,
    FullEvery,
    SourceUrl,
    TargetUrl,
    TimeWindow,
    VmName,
)
from flows.window import wait_for_window
from hypersdk.summary import MigrationResult

DOC = (
    """Incremental backup of one VM (what the nightly deployment runs).

    Args:"""
    + PARAMETER_DOCS
    + """        full_every: Force a full export after this many deltas in a row.
"""
)


@export_flow("backup-vm", DOC)
def backup_vm(
    vm: VmName,
    source: SourceUrl = None,
    target: TargetUrl = None,
    format: FormatName = "qcow2",
    full_every: FullEvery = 7,
    encryption: EncryptionRef = None,
    verify: bool = True,
    window: TimeWindow = None,
) -> MigrationResult:
    wait_for_window(window)  # outside it: rescheduled to its opening, or waits (flows/window)
    req = request_from("backup-vm", locals())
    result = run_export(req)
    print(f"{result.kind} backup of {result.vm}: {result.manifest}")
    return result
