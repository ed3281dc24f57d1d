"""A VM's history on a target and the choice of a delta's base.

The history is every manifest of the VM, newest first; a manifest that cannot be read is an
error naming it, never skipped (skipping would silently move a delta's base). The base of a
delta is the newest point of the disk a delta can build on, or None and the reason why a full
export comes instead (docs/repository.md).
"""

from __future__ import annotations

from typing import Any

from hypersdk.formats import get_driver
from hypersdk.manifest import DiskManifest, ExportManifest, read_manifest
from hypersdk.repository.layout import MAX_DELTAS_IN_A_ROW, manifest_keys, vm_prefix
from hypersdk.requests import ExportRequest


def read_history(target: Any, vm: str) -> list[ExportManifest]:
    """Every manifest of ``vm`` on ``target``, newest first."""
    keys = manifest_keys([o.key for o in target.list(vm_prefix(vm))], vm)
    return [read_manifest(target, key) for key in reversed(keys)]


def pick_base(
    history: list[ExportManifest], disk: str, req: ExportRequest
) -> tuple[tuple[ExportManifest, DiskManifest] | None, str]:
    """The newest point of ``disk`` a delta can build on (its export's manifest and the disk's
    entry), or None and the reason why not. A delta is an HSDELTA naming that point by export
    id and object hash, whatever the chain's format or target (docs/repository.md)."""
    if not req.incremental:
        return None, "full export asked for"
    if not history:
        return None, "no previous export on this target: full export"
    if get_driver(req.format).kind == "package":
        return None, f"format {req.format} packages the whole VM: full export"
    found = next(((m, d) for m in history for d in m.disks if d.name == disk), None)
    if found is None:
        return None, f"no previous export of disk {disk}: full export"
    _, newest = found
    if newest.base_key is not None:
        return None, "the previous export is a qcow2 delta named by path (older version): full"
    if (newest.image_format or newest.format) != req.format:
        return None, "previous export used another format: full export"
    if bool(newest.encryption) != (req.encryption is not None):
        return None, "previous export was encrypted differently: full export"
    if req.encryption is not None and req.encryption.method == "gpg":
        return None, "GPG exports have no random access to restore a chain through: full export"
    limit = min(req.full_every or MAX_DELTAS_IN_A_ROW, MAX_DELTAS_IN_A_ROW)
    deltas = 0
    for manifest in history:  # newest first, back to the last full export
        if manifest.kind != "incremental":
            break
        deltas += 1
    if deltas >= limit:
        why = f"full_every={req.full_every}" if req.full_every else "the longest chain kept"
        return None, f"{deltas} deltas since the last full ({why}): full export"
    return found, ""
