"""Checks a run can make without side effects, before anything is created: the URLs (scheme,
options, no secrets), the VM on the source and its disks, the target's place.

The CLI runs them before it starts Prefect at all, plain-Python flow calls before the flow run
is created, and deployment runs in their first task; each failure is one typed error (a wrong
VM name is VMNotFoundError, an unwritable target TargetError) with one readable line.
"""

from __future__ import annotations

from hypersdk.models import VMInfo
from hypersdk.requests import ExportRequest
from providers import open_source, open_target


def preflight(req: ExportRequest) -> VMInfo:
    """The VM the request names, once source and target pass their checks."""
    with open_target(req.target) as target:
        target.preflight()
    with open_source(req.source) as source:
        vm = source.get_vm(req.vm)
        source.preflight(vm)
    return vm
