"""A restore point as the chain of stored objects it is made of, read as one disk.

A point's disk is either a full (a standard image: qcow2, vmdk, ... or a disk inside an OVA) or
an HSDELTA naming its parent by export id, disk and object BLAKE3. ``load_chain`` follows those
links back to a full, checking each one against the parent's manifest (a missing manifest, a
missing disk or a hash that does not match is an error naming it: never a silently different
base). ``open_point`` opens every object through a coalescing reader (large ranged reads, a few
in flight), decrypts AES containers on the fly, and stacks the deltas on the full, so the top
layer reads as the point's guest bytes from any target. docs/repository.md describes the rules
so that a restore never depends on this code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hypersdk.errors import ObjectNotFoundError, VerificationError
from hypersdk.formats.base import DiskImage
from hypersdk.manifest import DiskManifest, ExportManifest, read_manifest
from hypersdk.references import printable
from hypersdk.repository.layout import manifest_key
from hypersdk.verify import open_logical

MAX_LINKS = 10_000  # a chain longer than this is a loop or an attack: retention keeps them short


@dataclass(frozen=True)
class Link:
    """One stored object of a chain: its export's manifest and the disk's entry in it."""

    manifest: ExportManifest
    disk: DiskManifest

    @property
    def export_id(self) -> str:
        return self.manifest.export_id


def point_manifest(target: Any, vm: str, export_id: str) -> ExportManifest:
    """The manifest of ``vm``'s point ``export_id``; ObjectNotFoundError naming it if absent."""
    key = manifest_key(vm, export_id)
    try:
        return read_manifest(target, key)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"no backup {printable(export_id)!r} of VM {printable(vm)!r} on {target.url} (no {key})"
        ) from None


def load_chain(target: Any, vm: str, export_id: str, disk: str) -> list[Link]:
    """The chain of ``disk`` at point ``export_id``, newest first, ending with a full."""
    manifest = point_manifest(target, vm, export_id)
    chain = [Link(manifest, manifest.disk(disk))]
    seen = {export_id}
    while chain[-1].disk.kind == "delta":
        child = chain[-1]
        link = child.disk.parent
        assert link is not None  # the manifest model guarantees it for a delta
        if link.export_id in seen or len(chain) >= MAX_LINKS:
            raise VerificationError(
                f"{child.disk.key}: its chain loops back to {link.export_id} or runs past "
                f"{MAX_LINKS} links"
            )
        seen.add(link.export_id)
        try:
            parent_manifest = point_manifest(target, vm, link.export_id)
        except ObjectNotFoundError as exc:
            raise VerificationError(
                f"{child.disk.key}: its parent point {link.export_id} is gone ({exc})"
            ) from None
        parent = parent_manifest.disk(link.disk)
        hashes = {parent.object_blake3}
        if parent.replaces is not None:  # a synthetic full stands in for the delta it replaced
            hashes.add(parent.replaces.object_blake3)
        if link.object_blake3 not in hashes:
            raise VerificationError(
                f"{child.disk.key}: its parent {parent.key} is not the object it was made on "
                f"(BLAKE3 {parent.object_blake3[:16]}..., the delta names "
                f"{link.object_blake3[:16]}...)"
            )
        if parent.virtual_size != link.virtual_size:
            raise VerificationError(
                f"{child.disk.key}: its parent {parent.key} holds {parent.virtual_size} bytes, "
                f"the delta says {link.virtual_size}"
            )
        chain.append(Link(parent_manifest, parent))
    return chain


def _plaintext(disk: DiskManifest, reader: Any, encryption: Any | None) -> Any:
    """The reader of the object's plaintext: random access through the AES container."""
    if not disk.encryption:
        return reader
    if encryption is None:
        raise VerificationError(f"{disk.key} is encrypted: give the key to read it")
    if disk.encryption.get("method") == "gpg":
        raise VerificationError(
            f"{disk.key} is a GPG message, which has no random access: decrypt it whole "
            "(hyperctl decrypt), or back up with the AES container for chains and restores"
        )
    from hypersdk.crypto import DecryptingReader

    return DecryptingReader(reader, encryption.resolve())


def open_stored(
    target: Any, disk: DiskManifest, encryption: Any | None, stack: contextlib.ExitStack
) -> DiskImage:
    """The stored object of ``disk`` opened as a disk image; everything it opened is closed by
    ``stack``. The object's size is checked against the manifest first (a truncated upload)."""
    reader = stack.enter_context(contextlib.closing(target.open_coalesced(disk.key)))
    if reader.size != disk.object_size:
        raise VerificationError(
            f"{disk.key}: {reader.size} bytes stored, the manifest says {disk.object_size}"
        )
    plain = _plaintext(disk, reader, encryption)
    if plain is not reader:
        stack.callback(plain.close)
    image = open_logical(disk, plain)
    stack.callback(image.close)
    return image


@contextlib.contextmanager
def open_point(
    target: Any, chain: list[Link], encryption: Any | None = None
) -> Iterator[DiskImage]:
    """The point's disk, composed from its chain (``load_chain``): the full at the bottom, each
    delta reading through to the one below where it has no entry."""
    with contextlib.ExitStack() as stack:
        image = open_stored(target, chain[-1].disk, encryption, stack)
        for link in reversed(chain[:-1]):
            layer = open_stored(target, link.disk, encryption, stack)
            _check_header(link.disk, layer)
            layer.parent_read = image.read  # type: ignore[attr-defined]
            layer.parent_extents = image.extents  # type: ignore[attr-defined]
            image = layer
        yield image


def _check_header(disk: DiskManifest, layer: Any) -> None:
    """The delta object names the same parent as its manifest (either could be tampered with)."""
    from hypersdk.formats.hsdelta import DeltaLayer

    if not isinstance(layer, DeltaLayer):
        raise VerificationError(f"{disk.key}: the manifest says delta, the object is not one")
    h, link = layer.header, disk.parent
    assert link is not None
    fields = (
        ("parent export", h.parent_export_id, link.export_id),
        ("parent disk", h.parent_disk, link.disk),
        ("parent hash", h.parent_object_blake3.hex(), link.object_blake3),
        ("parent size", h.parent_virtual_size, link.virtual_size),
        ("size", h.virtual_size, disk.virtual_size),
    )
    for name, header, manifest in fields:
        if header != manifest:
            raise VerificationError(
                f"{disk.key}: the delta's header and its manifest disagree on its {name} "
                f"({printable(str(header))[:80]} against {printable(str(manifest))[:80]})"
            )
