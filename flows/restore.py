"""restore_vm: a point of a VM's backup repository back as image files (``hyperctl restore`` as
a flow, for the UI's run form and the ``restore`` deployment).

Thin over hypersdk.repository.restore: find the point, then restore it (every object of each
disk's chain verified against its manifest before anything is written, output published only
when complete). The run's logs say which point and chain; a markdown artifact says what was
restored where; a progress artifact follows the bytes written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows.checked import checked_flow, checked_key, checked_target
from flows.ops_hooks import attach_ops_hooks
from flows.params import EncryptionRef, TargetUrl, VmName
from hypersdk.errors import InvalidParameterError, TargetError
from hypersdk.formats import get_driver, output_formats
from hypersdk.manifest import ExportManifest
from hypersdk.units import human
from tasks.common import io_task_options, stage_progress

# Formats a disk can be restored into (a package such as OVA holds a whole VM, not one disk).
RESTORE_FORMATS = tuple(f for f in output_formats() if get_driver(f).kind == "disk")
RestoreFormat = Literal[RESTORE_FORMATS]  # type: ignore[valid-type]
OutPath = Annotated[str, Field(min_length=1, max_length=4096)]
PointRef = Annotated[str, Field(min_length=1, max_length=255)]

DOC = """Restore a point of a VM from its backup repository: each disk's chain (a full and
    its deltas) is checked link by link and verified against the manifests, then written as
    one image per disk.

    Args:
        vm: The VM whose backups to restore (its name in the repository).
        out: Where to restore, an absolute path on the machine running the flow: a directory
            (it becomes a VM directory the local source reads back: vm.json and one image per
            disk), or, for a VM with one disk, an image file name with an extension.
        target: Target URL of the repository: file:///dir, s3://bucket/prefix,
            az://container/prefix, gs://bucket/prefix. Empty: $HYPERSDK_HOME/exports.
        at: The point: "latest", or an export id (hyperctl backups list shows them).
        format: Disk format of the restored images.
        encryption: Key of an encrypted repository: a key reference, never the key, e.g.
            {"method": "keyfile", "ref": "/etc/hypersdk/export.key"}.
"""


@dataclass(frozen=True)
class RestoreArgs:
    """Checked parameters of a restore."""

    vm: str
    out: Path
    target: str
    at: str
    format: str
    encryption: Any | None


def _writable_place(out: Path) -> None:
    """``out`` goes into an existing, writable directory (the engine creates no tree: a
    mistyped path must not grow one somewhere else)."""
    place = out if out.is_dir() else out.parent
    if not place.is_dir():
        raise InvalidParameterError(
            f"cannot restore into {out}: {place} is not an existing directory"
        )
    if not os.access(place, os.W_OK | os.X_OK):
        raise TargetError(f"cannot restore into {out}: {place} is not writable")


def check_restore(params: dict[str, Any]) -> RestoreArgs:
    """Everything a restore can check without reading the repository: one typed error each."""
    vm = params.get("vm")
    if not isinstance(vm, str) or not vm:
        raise InvalidParameterError("name the VM to restore (vm=NAME)")
    at = params.get("at", "latest")
    if not isinstance(at, str) or not at.strip():
        raise InvalidParameterError('at must be "latest" or an export id')
    fmt = params.get("format", "raw")
    if fmt not in RESTORE_FORMATS:
        raise InvalidParameterError(
            f"cannot restore a disk as {fmt!r}: choose one of {', '.join(RESTORE_FORMATS)}"
        )
    out = params.get("out")
    if not isinstance(out, str | os.PathLike) or not os.fspath(out):
        raise InvalidParameterError("say where to restore (out=/absolute/path)")
    out_path = Path(os.fspath(out)).expanduser()
    if not out_path.is_absolute():
        raise InvalidParameterError(
            f"out must be an absolute path, not {os.fspath(out)!r} (a deployment run's working "
            "directory is the checkout, not yours)"
        )
    _writable_place(out_path)
    target = checked_target(params)
    key = checked_key(params)
    return RestoreArgs(vm, out_path, target, at.strip(), fmt, key)


class RestoredImage(BaseModel):
    name: str
    path: str
    format: str
    virtual_size: int
    file_size: int
    chain: list[str]  # export ids of the objects read, newest first


class RestoreSummary(BaseModel):
    vm: str
    export_id: str
    kind: str
    created: str
    target: str
    out: str
    disks: list[RestoredImage]
    seconds: float


@task(name="find-point", task_run_name="find-point", cache_policy=NO_CACHE, **io_task_options(2))
def find_point(target_url: str, vm: str, at: str) -> ExportManifest:
    """The manifest of the point to restore ("latest": the newest complete one)."""
    from hypersdk.repository.restore import points, resolve_point
    from providers import open_target

    with open_target(target_url) as target:
        manifest = resolve_point(target, vm, at)
        count = len(points(target, vm))
    get_run_logger().info(
        "point %s of %r on %s: %s export of %s, %d disk(s) (%s); %d point(s) in the repository",
        manifest.export_id,
        vm,
        target_url,
        manifest.kind,
        manifest.created.isoformat(timespec="seconds"),
        len(manifest.disks),
        ", ".join(f"{d.name} {d.kind} {human(d.virtual_size)}" for d in manifest.disks),
        count,
    )
    return manifest


@task(name="restore-point", task_run_name="restore-point", cache_policy=NO_CACHE)
def restore(args: RestoreArgs, manifest: ExportManifest) -> list[RestoredImage]:
    """Every disk of the point into ``args.out``, verified first, published when complete."""
    from hypersdk.repository.restore import restore_point
    from providers import open_target

    logger = get_run_logger()
    total = sum(d.virtual_size for d in manifest.disks)
    with (
        open_target(args.target) as target,
        stage_progress(
            "restore", total, f"restore of {args.vm} at {manifest.export_id}"
        ) as progress,
    ):
        _, restored = restore_point(
            target,
            args.vm,
            manifest.export_id,
            args.out,
            args.format,
            args.encryption,
            progress=progress,
        )
    images = []
    for r in restored:
        size = os.path.getsize(r.path)
        logger.info(
            "%s: restored into %s (%s, %s of guest data, %s file) from a chain of %d "
            "object(s), verified, in %.1f s",
            r.name,
            r.path,
            r.format,
            human(r.virtual_size),
            human(size),
            len(r.chain),
            r.seconds,
        )
        images.append(
            RestoredImage(
                name=r.name,
                path=r.path,
                format=r.format,
                virtual_size=r.virtual_size,
                file_size=size,
                chain=r.chain,
            )
        )
    return images


def render_markdown(s: RestoreSummary) -> str:
    rows = "\n".join(
        f"| {d.name} | `{d.path}` | {d.format} | {human(d.virtual_size)} | {human(d.file_size)} "
        f"| {len(d.chain)} ({' ← '.join(d.chain)}) |"
        for d in s.disks
    )
    return (
        f"# Restore of `{s.vm}`\n\n"
        f"Point `{s.export_id}` ({s.kind} export of {s.created}) from `{s.target}` into "
        f"`{s.out}`, every object verified, in {s.seconds:.1f} s.\n\n"
        "| disk | image | format | virtual size | file size | chain (newest first) |\n"
        "|---|---|---|---|---|---|\n" + rows + "\n"
    )


def _artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60] or "vm"


@checked_flow("restore-vm", DOC, check_restore)
def restore_vm(
    vm: VmName,
    out: OutPath,
    target: TargetUrl = None,
    at: PointRef = "latest",
    format: RestoreFormat = "raw",
    encryption: EncryptionRef = None,
) -> RestoreSummary:
    started = time.perf_counter()
    args = check_restore(locals())
    manifest = find_point(args.target, args.vm, args.at)
    images = restore(args, manifest)
    summary = RestoreSummary(
        vm=args.vm,
        export_id=manifest.export_id,
        kind=manifest.kind,
        created=manifest.created.isoformat(timespec="seconds"),
        target=args.target,
        out=str(args.out),
        disks=images,
        seconds=time.perf_counter() - started,
    )
    create_markdown_artifact(
        render_markdown(summary),
        key=f"restore-{_artifact_key(args.vm)}",
        description=f"restore of {args.vm} at {manifest.export_id}",
    )
    print(f"restored point {manifest.export_id} of {args.vm} into {args.out}")
    return summary


attach_ops_hooks(restore_vm)  # audit line and webhooks (flows/ops_hooks.py)
