"""Verify an export against its manifest: the stored object's hash, then every logical chunk
re-read through the format reader (decrypting on the fly when the export is encrypted).

The manifest is untrusted (anyone who can write to the target can plant one): it is read with
bounds and checks (hypersdk.manifest.read_manifest), and the objects it names must lie in its
own export directory, so verifying never reads anything else on the target."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import blake3

from hypersdk.errors import VerificationError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver
from hypersdk.io import IO_CHUNK, read_pieces
from hypersdk.manifest import ZERO, check_chunks, key_problem, read_manifest
from hypersdk.references import printable


@dataclass
class DiskVerdict:
    name: str
    key: str
    object_ok: bool
    chunks_checked: int
    bad_chunks: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.object_ok and not self.bad_chunks


def _object_hash(reader) -> str:
    h = blake3.blake3()
    for _, data in read_pieces(reader, ExtentMap.full(reader.size).split(IO_CHUNK), threads=2):
        h.update(data)
    return h.hexdigest()


def stored_object_problem(target, disk) -> str | None:
    """One line naming what differs between ``disk``'s stored object and its manifest entry
    (size, then BLAKE3 of the stored bytes: ciphertext for an encrypted object), or None.
    One sequential pass of large reads, nothing cached: the object's bytes being exactly those
    written proves every chunk hash its manifest holds (checked when it was written)."""
    reader = target.open_reader(disk.key)
    try:
        if reader.size != disk.object_size:
            return (
                f"{disk.key}: the stored object is {reader.size} bytes, its manifest says "
                f"{disk.object_size}: it changed since it was written"
            )
        if _object_hash(reader) != disk.object_blake3:
            return f"{disk.key}: stored object hash differs from its manifest: it changed since it was written"
    finally:
        reader.close()
    return None


def _decrypting(disk, reader, encryption):
    """(plaintext reader, True), or (reader, False) where only the stored bytes can be checked:
    a GPG object has no random access, so its contents are checked by restoring it."""
    if encryption is None:
        raise VerificationError(f"{disk.key} is encrypted: give the key to verify its contents")
    if disk.encryption.get("method") == "gpg":
        return reader, False
    from hypersdk.crypto import DecryptingReader

    return DecryptingReader(reader, encryption.resolve()), True


def open_logical(disk, reader):
    """The guest-visible disk of a stored object (a member of a package, or the object itself)."""
    if disk.member is None:
        return get_driver(disk.format).open(reader)
    from hypersdk.formats.ova import Package

    package = Package(disk.key, archive=reader)
    for df in package.disk_files:
        if df.href == disk.member:
            return package.open_disk(df)
    raise VerificationError(f"{disk.key}: the package has no disk {printable(disk.member)!r}")


def _check_keys(manifest_key: str, disks) -> None:
    """Every object a manifest names lies in the manifest's own directory on the target."""
    home = posixpath.normpath(manifest_key).lstrip("/").rpartition("/")[0]
    for disk in disks:
        problem = key_problem(disk.key)
        if problem is None and home and not disk.key.startswith(home + "/"):
            problem = f"is outside the manifest's directory {printable(home)}/"
        if problem:
            raise VerificationError(
                f"{manifest_key}: disk {printable(disk.name)!r}: object key "
                f"{printable(disk.key)!r} {problem}: refused"
            )


def _check_disk(image, chunks, delta: bool) -> list[int]:
    """Offsets of the chunks ``image`` does not match. A hashed chunk past the image's end is a
    mismatch without a read: a planted manifest cannot make verify read beyond the disk (zero
    runs only read the image's own data extents). A delta's chunks cover its own entries,
    which it answers without its chain."""
    inside = [c for c in chunks if c[2] == ZERO or c[0] + c[1] <= image.size]
    past = [c[0] for c in chunks if c[2] != ZERO and c[0] + c[1] > image.size]
    extents = image.own_extents() if delta else image.extents()
    return sorted(check_chunks(image, inside, extents) + past)


def check_disk(target, disk, encryption: Any | None = None) -> DiskVerdict:
    """One stored object against its manifest entry: the object's size and BLAKE3, then every
    chunk hash of the guest bytes it defines (through the decryption when encrypted)."""
    reader = target.open_coalesced(disk.key)  # a pass over the whole object: few requests
    try:
        object_ok = reader.size == disk.object_size and _object_hash(reader) == disk.object_blake3
        logical, logical_ok = reader, True
        if disk.encryption:
            logical, logical_ok = _decrypting(disk, reader, encryption)
        bad: list[int] = []
        if logical_ok:
            image = open_logical(disk, logical)
            try:
                bad = _check_disk(image, disk.chunks, disk.kind == "delta")
            finally:
                image.close()
    finally:
        reader.close()
    checked = len(disk.chunks) if logical_ok else 0
    return DiskVerdict(disk.name, disk.key, object_ok, checked, bad)


def _mismatch(verdicts: list[DiskVerdict]) -> VerificationError:
    parts = []
    for v in verdicts:
        what = [] if v.object_ok else ["stored object hash differs"]
        if v.bad_chunks:
            what.append(f"{len(v.bad_chunks)} chunk(s) differ, first at offset {v.bad_chunks[0]}")
        parts.append(f"{v.key}: {', '.join(what)}")
    return VerificationError("export does not match its manifest: " + "; ".join(parts))


def verify_disk(target, disk, encryption: Any | None = None) -> DiskVerdict:
    """``check_disk``, raising VerificationError naming the object on any mismatch."""
    verdict = check_disk(target, disk, encryption)
    if not verdict.ok:
        raise _mismatch([verdict])
    return verdict


def verify_export(target, manifest_key: str, encryption: Any | None = None) -> list[DiskVerdict]:
    """Raise VerificationError on any mismatch; return the per-disk verdicts when all is well.
    A manifest that cannot be read is a FormatError naming it."""
    manifest = read_manifest(target, manifest_key)
    _check_keys(manifest_key, manifest.disks)
    verdicts = [check_disk(target, disk, encryption) for disk in manifest.disks]
    failed = [v for v in verdicts if not v.ok]
    if failed:
        raise _mismatch(failed)
    return verdicts
