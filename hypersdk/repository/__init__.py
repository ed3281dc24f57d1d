"""The backup repository on a target: where a VM's points live (layout), how they chain, how
they are locked, kept and forgotten. Prefect-free; flows and tasks call it.

docs/repository.md documents every object and field, so a restore never depends on this code.
"""

from hypersdk.repository.layout import (
    MANIFEST_NAME,
    MAX_DELTAS_IN_A_ROW,
    disk_key,
    export_prefix,
    manifest_key,
    manifest_keys,
    package_key,
    vm_prefix,
)

__all__ = [
    "MANIFEST_NAME",
    "MAX_DELTAS_IN_A_ROW",
    "disk_key",
    "export_prefix",
    "manifest_key",
    "manifest_keys",
    "package_key",
    "vm_prefix",
]
