"""QCOW2 backing files: whether the file a delta names may be opened, and the chain's limits.

A backing file name comes from the image, so it is hostile: it is resolved only through
``hypersdk.references`` (inside the image's own directory, or a repository chain, unless the
policy in force allows more), must be a regular file, and an image that is not a local file (an
OVA member) may name none. Chains stop at ``MAX_CHAIN`` images and may not loop.
"""

from __future__ import annotations

import contextvars
import os

from hypersdk.errors import FormatError, HyperSDKError, UnsupportedFormatError
from hypersdk.formats.base import DiskImage
from hypersdk.io import FileRangeReader, RangeReader
from hypersdk.references import printable, require_regular, resolve_reference

MAX_CHAIN = 16
WHAT = "backing file"

# real paths of the images being opened above this one (loop and depth detection)
_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qcow2_chain", default=())


def backing_path(reader: RangeReader, image_name: str, name: str) -> str:
    """The real path of backing file ``name`` of the image read by ``reader``; FormatError
    (naming the image and the offending path) when it may not be opened."""
    local = reader.name if isinstance(reader, FileRangeReader) else None
    try:
        path = resolve_reference(local, name, WHAT)
    except FormatError as exc:
        raise FormatError(image_name, exc.problem) from None
    try:
        require_regular(path, WHAT)
    except FormatError as exc:
        raise FormatError(image_name, f"{exc.problem}: {printable(path)}") from None
    return path


def open_backing(reader: RangeReader, image_name: str, name: str, fmt_name: str) -> DiskImage:
    """Open backing file ``name`` (format ``fmt_name``, probed when empty) of an image."""
    from hypersdk.formats import get_driver, open_image  # the registry imports this module

    path = backing_path(reader, image_name, name)
    fmt = None
    if fmt_name:
        try:
            fmt = get_driver(fmt_name).name
        except UnsupportedFormatError:
            raise UnsupportedFormatError(
                image_name,
                f"backing file {printable(name)!r} has format {printable(fmt_name)!r}, "
                "which is not supported",
            ) from None
    chain = _CHAIN.get()
    me = path_of(reader)
    if path in chain or path == me:
        raise FormatError(image_name, f"backing chain loops back to {printable(path)}")
    if len(chain) + 1 >= MAX_CHAIN:
        raise FormatError(image_name, f"backing chain deeper than {MAX_CHAIN}")
    token = _CHAIN.set(chain + ((me,) if me else ()))
    try:
        return open_image(path, fmt)
    except HyperSDKError as exc:
        raise FormatError(image_name, f"backing file: {exc}") from None
    finally:
        _CHAIN.reset(token)


def path_of(reader: RangeReader) -> str | None:
    """The real path of a local image (None for an OVA member or any other non-file)."""
    return os.path.realpath(reader.name) if isinstance(reader, FileRangeReader) else None
