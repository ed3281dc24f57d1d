"""Verify an export against its manifest: the stored object's hash, then every logical chunk
re-read through the format reader (decrypting on the fly when the export is encrypted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import blake3

from hypersdk.errors import VerificationError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver
from hypersdk.io import IO_CHUNK, read_pieces
from hypersdk.manifest import ExportManifest, check_chunks


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


def _decrypting(disk, reader, encryption):
    """(plaintext reader, True), or (reader, False) where only the stored bytes can be checked:
    a GPG object has no random access, so its contents are checked by restoring it."""
    if encryption is None:
        raise VerificationError(f"{disk.key} is encrypted: give the key to verify its contents")
    if disk.encryption.get("method") == "gpg":
        return reader, False
    from hypersdk.crypto import DecryptingReader

    return DecryptingReader(reader, encryption.resolve()), True


def _open_logical(disk, reader):
    """The guest-visible disk of a stored object (a member of a package, or the object itself)."""
    if disk.member is None:
        return get_driver(disk.format).open(reader)
    from hypersdk.formats.ova import Package

    package = Package(disk.key, archive=reader)
    for df in package.disk_files:
        if df.href == disk.member:
            return package.open_disk(df)
    raise VerificationError(f"{disk.key}: the package has no disk {disk.member!r}")


def verify_export(target, manifest_key: str, encryption: Any | None = None) -> list[DiskVerdict]:
    """Raise VerificationError on any mismatch; return the per-disk verdicts when all is well."""
    manifest = ExportManifest.from_json(target.get_bytes(manifest_key))
    verdicts = []
    for disk in manifest.disks:
        reader = target.open_reader(disk.key)
        try:
            object_ok = (
                reader.size == disk.object_size and _object_hash(reader) == disk.object_blake3
            )
            logical, logical_ok = reader, True
            if disk.encryption:
                logical, logical_ok = _decrypting(disk, reader, encryption)
            bad: list[int] = []
            if logical_ok:
                image = _open_logical(disk, logical)
                try:
                    bad = check_chunks(image, disk.chunks, image.extents())
                finally:
                    image.close()
        finally:
            reader.close()
        checked = len(disk.chunks) if logical_ok else 0
        verdicts.append(DiskVerdict(disk.name, disk.key, object_ok, checked, bad))
    failed = [v for v in verdicts if not v.ok]
    if failed:
        parts = []
        for v in failed:
            what = [] if v.object_ok else ["stored object hash differs"]
            if v.bad_chunks:
                what.append(
                    f"{len(v.bad_chunks)} chunk(s) differ, first at offset {v.bad_chunks[0]}"
                )
            parts.append(f"{v.key}: {', '.join(what)}")
        raise VerificationError("export does not match its manifest: " + "; ".join(parts))
    return verdicts
