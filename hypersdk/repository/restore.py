"""Restore a point of a VM from its repository: any point, into any image format or into a local
VM directory the local source reads back.

Each disk's chain is loaded and checked link by link (hypersdk.repository.chain), every stored
object of it is verified against its manifest (object hash, then every chunk hash of the bytes
that layer defines) before anything is written, and the composed disk is converted by the format
driver into a temporary file published only when complete (hypersdk.atomic). Streaming, bounded
memory; decryption on the fly for the AES container.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypersdk.atomic import write_bytes_atomic
from hypersdk.convert import convert_image
from hypersdk.errors import InvalidParameterError, ObjectNotFoundError, VerificationError
from hypersdk.formats import extension_for, output_driver
from hypersdk.manifest import ExportManifest
from hypersdk.names import safe_component
from hypersdk.repository.chain import Link, load_chain, open_point, point_manifest
from hypersdk.repository.layout import manifest_keys, vm_prefix


@dataclass
class RestoredDisk:
    name: str
    path: str
    format: str
    virtual_size: int
    chain: list[str]  # export ids, newest first
    seconds: float


def points(target: Any, vm: str) -> list[str]:
    """Export ids of ``vm``'s complete points on ``target``, oldest first."""
    keys = manifest_keys([o.key for o in target.list(vm_prefix(vm))], vm)
    return [k.rsplit("/", 2)[-2] for k in keys]


def resolve_point(target: Any, vm: str, at: str) -> ExportManifest:
    """The manifest of point ``at`` ("latest" or an export id)."""
    if at == "latest":
        found = points(target, vm)
        if not found:
            raise ObjectNotFoundError(f"no backups of VM {vm!r} on {target.url}")
        at = found[-1]
    return point_manifest(target, vm, at)


def verify_chain(target: Any, chain: list[Link], encryption: Any | None) -> None:
    """Every object of the chain matches its manifest (object hash and chunk hashes); the first
    mismatch is a VerificationError naming the object and the offset."""
    from hypersdk.verify import verify_disk

    for link in chain:
        verify_disk(target, link.disk, encryption)


def restore_disk(
    target: Any,
    vm: str,
    export_id: str,
    disk: str,
    dst: str | os.PathLike,
    fmt: str,
    encryption: Any | None = None,
    cache: str = "none",
    progress: Any | None = None,
) -> RestoredDisk:
    started = time.perf_counter()
    output_driver(fmt)
    chain = load_chain(target, vm, export_id, disk)
    verify_chain(target, chain, encryption)
    with open_point(target, chain, encryption) as image:
        convert_image(image, dst, fmt, None, progress, cache=cache)
        size = image.size
    return RestoredDisk(
        disk,
        os.fspath(dst),
        fmt,
        size,
        [link.export_id for link in chain],
        time.perf_counter() - started,
    )


def restore_point(
    target: Any,
    vm: str,
    at: str,
    out: str | os.PathLike,
    fmt: str | None = None,
    encryption: Any | None = None,
    cache: str = "none",
    progress: Any | None = None,
) -> tuple[ExportManifest, list[RestoredDisk]]:
    """Restore point ``at`` of ``vm`` into ``out``: a directory that becomes a local VM
    directory (vm.json and one image per disk, in ``fmt``, default the chain's own format), or,
    for a VM with one disk, an image file when ``out`` names one with an extension."""
    manifest = resolve_point(target, vm, at)
    out = Path(out)
    disks = manifest.disks
    if not disks:
        raise VerificationError(f"point {manifest.export_id} of {vm!r} holds no disks")
    if any(d.member is not None for d in disks) and fmt is None:
        fmt = "qcow2"  # a package's disks: restore each as a disk image
    if out.suffix and not out.is_dir():
        if len(disks) != 1:
            raise InvalidParameterError(
                f"VM {vm!r} has {len(disks)} disks: restore it into a directory, not {out}"
            )
        one_fmt = fmt or disks[0].image_format or disks[0].format
        return manifest, [
            restore_disk(
                target,
                vm,
                manifest.export_id,
                disks[0].name,
                out,
                one_fmt,
                encryption,
                cache,
                progress,
            )
        ]
    out.mkdir(parents=True, exist_ok=True)
    restored = []
    vm_info = manifest.vm.model_copy(deep=True)
    vm_info.power_state = "poweredOff"  # a restored VM is files, not a running machine
    for d in disks:
        disk_fmt = fmt or d.image_format or d.format
        if output_driver(disk_fmt).kind != "disk":
            disk_fmt = "qcow2"
        name = f"{safe_component(d.name, 'disk name')}{extension_for(disk_fmt)}"
        restored.append(
            restore_disk(
                target,
                vm,
                manifest.export_id,
                d.name,
                out / name,
                disk_fmt,
                encryption,
                cache,
                progress,
            )
        )
        for info in vm_info.disks:
            if info.name == d.name:
                info.backing, info.format = name, disk_fmt
    # the local source's VM description (providers/sources/local.py reads it back)
    write_bytes_atomic(out / "vm.json", vm_info.model_dump_json(indent=2).encode())
    return manifest, restored
