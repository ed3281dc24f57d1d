"""Clean up after runs that were killed: unfinished uploads and objects no manifest names.

A run killed mid-way (kill -9, a power cut) cannot abort what it was writing. It leaves:

- unfinished uploads (S3 multipart uploads, Azure uncommitted blobs, local temporary files):
  invisible as objects, yet stored and, on cloud stores, billed;
- complete objects no manifest names: the disks of an export whose manifest was never written,
  the synthetic full of a forget killed before it committed the rebased manifest, the delta a
  committed synthetic full replaced (its ``replaces``) that was not deleted yet, the objects of
  a forgotten point whose manifest was already deleted.

None of them is part of a committed point: a point is its manifest and the objects it names,
and a chain follows its parents through their manifests (a child's ``parent.key`` names an
object only for the record; a replaced delta is found by ``replaces.object_blake3``). So the
next run that writes the VM's repository, holding its lock (no other run writes there then),
removes them before it starts. Conservative on purpose:

- only keys of the form ``<vm>/<export id>/...`` are export objects: the lock object, its
  takeover markers and anything else directly under ``<vm>/`` are never touched;
- every object a readable manifest names (``key``, and a v1 delta's ``base_key``), and every
  key in ``keep``, stays;
- when any manifest of the VM cannot be read (damaged, truncated, a schema this version does
  not know, which might name objects elsewhere), no object is deleted at all: each unreadable
  manifest is reported and unfinished uploads are still aborted (no manifest can name one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypersdk.errors import HyperSDKError, RepositoryLockedError
from hypersdk.manifest import read_manifest
from hypersdk.names import is_export_id
from hypersdk.references import printable
from hypersdk.repository.layout import MANIFEST_NAME, vm_prefix
from hypersdk.units import human

log = logging.getLogger(__name__)


@dataclass
class CleanupReport:
    """What ``clean_abandoned`` did, and what it left and why."""

    aborted: list[str] = field(default_factory=list)  # keys of the unfinished uploads aborted
    deleted: list[str] = field(default_factory=list)  # keys of the unnamed objects deleted
    deleted_bytes: int = 0
    unreadable: list[str] = field(default_factory=list)  # manifests that could not be read
    problems: list[str] = field(default_factory=list)  # what could not be done (one line each)

    @property
    def removed(self) -> int:
        return len(self.aborted) + len(self.deleted)


def _export_id(key: str, prefix: str) -> str | None:
    """The export id of an export object's key (``<vm>/<export id>/<name...>``), else None."""
    if not key.startswith(prefix):
        return None
    export_id, sep, rest = key[len(prefix) :].partition("/")
    return export_id if sep and rest and is_export_id(export_id) else None


def _check_lock(target: Any, vm: str, lock: Any) -> None:
    """The caller must hold this VM's lock on this target, still (a refresh proves it)."""
    prefix = vm_prefix(vm)
    ours = (
        lock is not None
        and getattr(lock, "held", False)
        and getattr(lock, "lost", None) is None
        and getattr(lock, "vm_prefix", None) in (prefix, prefix.rstrip("/"))
        and getattr(lock.target, "url", None) == target.url
    )
    if not ours:
        raise RepositoryLockedError(
            f"{target.location(prefix)}: cleaning up needs the lock of VM {printable(vm)!r} "
            "on this target, held by this run"
        )
    lock.refresh()  # RepositoryLockedError if another run took it over meanwhile


def clean_abandoned(
    target: Any,
    vm: str,
    lock: Any,
    keep: set[str] | None = None,
    say: Callable[[str], None] = log.info,
) -> CleanupReport:
    """Abort the unfinished uploads under ``vm``'s prefix and delete the export objects no
    manifest names (see the module for what stays). ``lock`` is the RepositoryLock of ``vm``
    on ``target``, held: RepositoryLockedError otherwise. ``keep``: keys never to delete,
    besides what the manifests name. One line per removal to ``say``, then a summary."""
    _check_lock(target, vm, lock)
    prefix = vm_prefix(vm)
    report = CleanupReport()
    _abort_uploads(target, prefix, report, say)
    _delete_unnamed(target, prefix, keep or set(), report, say)
    size = f" ({human(report.deleted_bytes)})" if report.deleted else ""
    if report.removed or report.unreadable or report.problems:
        say(
            f"cleanup of {printable(vm)!r} on {target.url}: {len(report.aborted)} unfinished "
            f"upload(s) aborted, {len(report.deleted)} unreferenced object(s) deleted{size}"
            + (f", {len(report.problems)} problem(s)" if report.problems else "")
        )
    return report


def _abort_uploads(target: Any, prefix: str, report: CleanupReport, say) -> None:
    try:
        uploads = target.pending_uploads(prefix)
    except NotImplementedError:
        report.problems.append(f"{target.url}: cannot list unfinished uploads on this target")
        say(f"cleanup: {report.problems[-1]}")
        return
    for upload in uploads:
        if _export_id(upload.key, prefix) is None:
            continue  # not an export object (a lock being created, say): never ours to abort
        try:
            target.abort_upload(upload)
        except HyperSDKError as exc:
            report.problems.append(f"{upload.key}: could not abort its unfinished upload: {exc}")
            say(f"cleanup: {report.problems[-1]}")
            continue
        report.aborted.append(upload.key)
        when = f", begun {upload.started.isoformat(timespec='seconds')}" if upload.started else ""
        held = f", {human(upload.size)}" if upload.size else ""
        say(f"cleanup: aborted the unfinished upload of {upload.key}{when}{held}")


def _delete_unnamed(target: Any, prefix: str, keep: set[str], report: CleanupReport, say) -> None:
    objects = {}
    manifests = []
    for obj in target.list(prefix):
        export_id = _export_id(obj.key, prefix)
        if export_id is None:
            continue
        if obj.key == f"{prefix}{export_id}/{MANIFEST_NAME}":
            manifests.append((export_id, obj.key))
        else:
            objects[obj.key] = obj
    named = set(keep)
    replaced: dict[str, str] = {}  # key of a replaced delta -> the point whose full replaced it
    with_manifest = set()
    for export_id, key in manifests:
        try:
            manifest = read_manifest(target, key)
        except Exception as exc:  # noqa: BLE001 - whatever the reason, it names what we cannot tell
            report.unreadable.append(key)
            say(f"cleanup: cannot read {key} ({printable(str(exc))[:200]})")
            continue
        with_manifest.add(export_id)
        for d in manifest.disks:
            named.add(d.key)
            if d.base_key:
                named.add(d.base_key)
            if d.replaces is not None:
                replaced[d.replaces.key] = export_id
    garbage = sorted(k for k in objects if k not in named)
    if report.unreadable:
        if garbage:
            report.problems.append(
                f"{len(garbage)} object(s) no readable manifest names left in place: "
                f"{len(report.unreadable)} manifest(s) could not be read"
            )
            say(f"cleanup: {report.problems[-1]}")
        return
    for key in garbage:
        export_id = _export_id(key, prefix)
        if key in replaced:
            why = f"the delta replaced by the synthetic full of point {replaced[key]}"
        elif export_id in with_manifest:
            why = f"not named by the manifest of point {export_id}"
        else:
            why = f"point {export_id} has no manifest (its run did not finish)"
        try:
            target.delete(key)
        except HyperSDKError as exc:
            report.problems.append(f"{key}: could not delete: {exc}")
            say(f"cleanup: {report.problems[-1]}")
            continue
        report.deleted.append(key)
        report.deleted_bytes += objects[key].size
        say(f"cleanup: deleted {key} ({human(objects[key].size)}): {why}")
