"""VMDK parent disks: the disk a delta (a snapshot, a linked clone) reads its unallocated grains
from, named in the delta's descriptor by ``parentFileNameHint`` and pinned by ``parentCID``.

The hint comes from the image, so it is hostile: it is resolved only through
``hypersdk.references`` (the delta's own directory unless the policy in force allows more) and
must be a regular file. ESXi writes absolute hints (``/vmfs/volumes/<datastore>/vm/vm.vmdk``)
that mean nothing on this machine: when the hint's own path is refused or missing, its bare
file name is looked up in the delta's directory (as dissect.hypervisor does), under the same
rules, and ``info`` says so. A disk inside a package (an OVA member) may name no parent.

The parent is opened as a VMDK (as qemu does) and its ``CID`` must equal the delta's
``parentCID`` (qemu's ``vmdk_is_cid_valid``): a parent written to after the snapshot was taken
holds other data, and reading through to it would give a disk that never existed. Chains share
the qcow2 backing chains' limits (``_qcow2_backing``: 16 images, loops refused), counted across
formats (a qcow2 whose backing file is a VMDK delta is one chain).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypersdk.errors import FormatError, HyperSDKError, UnsupportedFormatError
from hypersdk.formats._qcow2_backing import _CHAIN, MAX_CHAIN, path_of
from hypersdk.formats._vmdk_descriptor import Descriptor
from hypersdk.formats.base import DiskImage
from hypersdk.io import FileRangeReader, RangeReader
from hypersdk.references import printable, require_regular, resolve_reference

WHAT = "parent disk"
NO_PARENT = 0xFFFF_FFFF  # parentCID of a disk that has none
_HEX32 = re.compile(r"[0-9a-fA-F]{1,8}")


@dataclass(frozen=True)
class ParentLink:
    """How a delta found its parent (for ``info``)."""

    hint: str  # parentFileNameHint as the descriptor writes it
    cid: int  # the delta's parentCID, equal to the parent's CID
    path: str  # the real path opened
    note: str = ""  # how the parent was found when not at the hint's own path


def cid_field(desc: Descriptor, key: str, name: str) -> int | None:
    """A descriptor's CID or parentCID (None when absent); FormatError when not 32-bit hex."""
    raw = desc.fields.get(key.lower())
    if raw is None:
        return None
    if not _HEX32.fullmatch(raw.strip()):
        raise FormatError(name, f"VMDK descriptor {key} {printable(raw)[:40]!r} is not a hex CID")
    return int(raw, 16)


def open_parent(
    reader: RangeReader, name: str, desc: Descriptor | None, in_package: bool = False
) -> tuple[DiskImage, ParentLink] | None:
    """The parent of the delta read by ``reader`` (None when ``desc`` names none), opened and
    proven by its CID; FormatError naming the delta (``name``) when it may not be used."""
    if desc is None:
        return None
    hint = desc.fields.get("parentfilenamehint")
    parent_cid = cid_field(desc, "parentCID", name)
    if hint is None:
        if parent_cid is None or parent_cid == NO_PARENT:
            return None
        raise FormatError(
            name,
            f"is a VMDK delta disk (parentCID {parent_cid:08x}) but names no parent "
            "(parentFileNameHint): it cannot be read on its own",
        )
    if parent_cid is None:
        parent_cid = NO_PARENT
    shown = printable(hint)
    if in_package or not isinstance(reader, FileRangeReader):
        where = "a disk inside a package" if in_package else "an image that is not a local file"
        raise FormatError(name, f"{WHAT} {shown!r}: {where} may not name a parent disk")
    path, note = _locate(reader.name, hint, name)
    chain, me = _CHAIN.get(), path_of(reader)
    if path in chain or path == me:
        raise FormatError(name, f"{WHAT} chain loops back to {printable(path)}")
    if len(chain) + 1 >= MAX_CHAIN:
        raise FormatError(name, f"{WHAT} chain deeper than {MAX_CHAIN} disks")
    from hypersdk.formats import open_image  # the registry imports the driver, which imports us

    token = _CHAIN.set(chain + ((me,) if me else ()))
    try:
        parent = open_image(path, "vmdk")
    except HyperSDKError as exc:
        kind = UnsupportedFormatError if isinstance(exc, UnsupportedFormatError) else FormatError
        raise kind(name, f"{WHAT} {shown!r}: {exc}") from None
    finally:
        _CHAIN.reset(token)
    try:
        _prove(parent, parent_cid, shown, name)
    except BaseException:
        parent.close()
        raise
    return parent, ParentLink(hint, parent_cid, path, note)


def _prove(parent: DiskImage, parent_cid: int, shown: str, name: str) -> None:
    """The parent's CID must be the delta's parentCID (qemu: vmdk_is_cid_valid)."""
    desc = getattr(parent, "descriptor", None)
    cid = cid_field(desc, "CID", parent.name) if desc is not None else None
    if cid is None:
        raise FormatError(
            name,
            f"{WHAT} {shown!r} ({printable(parent.name)}) has no CID, so nothing shows it is "
            f"the disk this delta was taken from (parentCID {parent_cid:08x})",
        )
    if cid != parent_cid:
        raise FormatError(
            name,
            f"{WHAT} {shown!r} ({printable(parent.name)}) has CID {cid:08x}, but this delta's "
            f"parentCID is {parent_cid:08x}: the parent was changed after the snapshot was "
            "taken, or it is another disk (refused, as qemu does)",
        )


def _try(referrer: str, name: str) -> tuple[str, str, str]:
    """(real path, "", "") if ``name`` may be opened, else ("", problem, why in a few words)."""
    try:
        path = resolve_reference(referrer, name, WHAT)
    except FormatError as exc:
        return "", exc.problem, "is refused"
    try:
        require_regular(path, WHAT)
    except FormatError as exc:
        return "", f"{exc.problem}: {printable(path)}", exc.problem.removeprefix(WHAT + " ")
    return path, "", ""


def _locate(referrer: str, hint: str, name: str) -> tuple[str, str]:
    """(real path, note) of the parent ``hint`` names: the hint's own path, else its bare name
    in the delta's directory (``note`` then says why)."""
    wanted = hint.replace("\\", "/")  # a hint written on Windows
    path, first, why = _try(referrer, wanted)
    if path:
        return path, ""
    bare = wanted.rsplit("/", 1)[-1]
    if bare == wanted or bare in ("", ".", ".."):
        raise FormatError(name, first)
    path, second, _ = _try(referrer, bare)
    if not path:
        raise FormatError(
            name, f"{first}; its bare name {printable(bare)!r} is no better: {second}"
        )
    return path, f"the hint's own path {why}: found as {printable(bare)!r} in the image's directory"
