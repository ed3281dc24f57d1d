"""Restore a point of a VM from its repository: any point, into any image format or into a local
VM directory the local source reads back.

Each disk's chain is loaded and checked link by link (hypersdk.repository.chain); the composed
disk is converted by the format driver into a temporary file (hypersdk.atomic) while a second
thread re-reads every stored object of the chain and checks its size and BLAKE3 against its
manifest; the output is published only when both are done and every object is intact. An intact
object is byte for byte what the backup wrote and verified chunk by chunk (its verify-export
step), so the chunk hashes hold too (``hyperctl verify`` re-checks them); the AES container
authenticates every chunk it decrypts on top. Streaming, bounded memory.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypersdk.atomic import write_bytes_atomic
from hypersdk.convert import convert_image
from hypersdk.errors import InvalidParameterError, ObjectNotFoundError, VerificationError
from hypersdk.formats import extension_for, output_driver
from hypersdk.manifest import ExportManifest
from hypersdk.names import safe_component
from hypersdk.references import printable
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


def chain_problem(target: Any, chain: list[Link]) -> str | None:
    """The first stored object of the chain that is not exactly the bytes its manifest names
    (size and BLAKE3), as one line naming it; None when every one is intact."""
    from hypersdk.verify import stored_object_problem

    for link in chain:
        problem = stored_object_problem(target, link.disk)
        if problem is not None:
            return problem
    return None


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
    # The stored objects are hashed in a thread while the point is written (two cores); the
    # output takes its name only once every object proved intact.
    with ThreadPoolExecutor(1, thread_name_prefix="restore-check") as pool:
        checked = pool.submit(chain_problem, target, chain)

        def all_intact() -> None:
            problem = checked.result()
            if problem is not None:
                raise VerificationError(problem)

        try:
            with open_point(target, chain, encryption) as image:
                convert_image(
                    image, dst, fmt, None, progress, cache=cache, before_publish=all_intact
                )
                size = image.size
        except VerificationError:
            raise
        except Exception as exc:
            problem = checked.result()  # a changed object explains a reader's failure best
            if problem is not None:
                raise VerificationError(problem) from exc
            raise
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
    out = Path(out)
    if fmt is not None:
        output_driver(fmt)  # the user's mistake, before anything is read
    if not out.parent.is_dir():  # a mistyped path must not grow a tree somewhere else
        raise InvalidParameterError(
            f"{out.parent} is not an existing directory: create it first, or restore elsewhere"
        )
    manifest = resolve_point(target, vm, at)
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
    created = not out.exists()
    out.mkdir(exist_ok=True)
    restored: list[RestoredDisk] = []
    try:
        _restore_into(target, vm, manifest, out, fmt, encryption, cache, progress, restored)
    except BaseException:  # a failed restore leaves nothing under OUT (a wrong key, a bad chain)
        for r in restored:
            Path(r.path).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return manifest, restored


def _restore_into(
    target: Any,
    vm: str,
    manifest: ExportManifest,
    out: Path,
    fmt: str | None,
    encryption: Any | None,
    cache: str,
    progress: Any | None,
    restored: list[RestoredDisk],
) -> None:
    """Every disk of the point into the directory ``out``, then its vm.json (appending each
    restored disk to ``restored`` as it is published)."""
    vm_info = manifest.vm.model_copy(deep=True)
    vm_info.power_state = "poweredOff"  # a restored VM is files, not a running machine
    for d in manifest.disks:
        disk_fmt = fmt or d.image_format or d.format
        try:
            if output_driver(disk_fmt).kind != "disk":
                disk_fmt = "qcow2"
        except InvalidParameterError as exc:  # fmt was checked first: the manifest names it
            raise VerificationError(
                f"{vm}/{manifest.export_id}/manifest.json: disk {printable(d.name)!r}: {exc}"
            ) from None
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
