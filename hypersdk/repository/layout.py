"""Where exports live on a target: the key layout of a VM's exports.

    <vm>/<export id>/manifest.json
    <vm>/<export id>/<disk><extension>[.hsenc]      (or <vm>.ova[.hsenc] for a package)

Every name that becomes a key segment (VM, disk, export id) comes from a source we do not
trust, so it goes through ``hypersdk.names.safe_component`` (reversible percent-encoding: a disk
named ``../../other-vm/x`` stays one segment of its own VM's export); manifests keep the
original names. Flows and tasks build keys here and nowhere else.
"""

from __future__ import annotations

from hypersdk.names import check_export_id, safe_component

MANIFEST_NAME = "manifest.json"
# Deltas in a row before an incremental run makes a full again: image readers follow backing
# chains of at most 16 images (formats._qcow2_backing.MAX_CHAIN), the full and 15 deltas.
MAX_DELTAS_IN_A_ROW = 15


def vm_prefix(vm: str) -> str:
    """The key prefix of every export of ``vm`` (ends with a slash)."""
    return f"{safe_component(vm, 'VM name')}/"


def export_prefix(vm: str, export_id: str) -> str:
    return f"{vm_prefix(vm)}{check_export_id(export_id)}/"


def manifest_key(vm: str, export_id: str) -> str:
    return export_prefix(vm, export_id) + MANIFEST_NAME


def disk_key(vm: str, export_id: str, disk: str, extension: str, encrypted: bool) -> str:
    suffix = ".hsenc" if encrypted else ""
    return f"{export_prefix(vm, export_id)}{safe_component(disk, 'disk name')}{extension}{suffix}"


def package_key(vm: str, export_id: str, encrypted: bool) -> str:
    suffix = ".hsenc" if encrypted else ""
    return f"{export_prefix(vm, export_id)}{safe_component(vm, 'VM name')}.ova{suffix}"


def manifest_keys(keys: list[str], vm: str) -> list[str]:
    """Of ``keys`` (a listing under ``vm_prefix(vm)``), the manifests of ``vm``'s complete
    exports, oldest first (export ids sort by time)."""
    prefix = vm_prefix(vm)
    out = []
    for key in keys:
        rest = key[len(prefix) :] if key.startswith(prefix) else ""
        export_id, _, name = rest.partition("/")
        if name == MANIFEST_NAME and export_id:
            out.append(key)
    return sorted(out)
