"""Format registry: every module in this package that defines ``DRIVER`` is a format.

Adding a format means adding one module (and its tests); nothing here changes.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache

from hypersdk.errors import FormatError, UnsupportedFormatError
from hypersdk.formats.base import DiskImage, FormatDriver, Layout
from hypersdk.io import FileRangeReader, RangeReader

__all__ = ["DiskImage", "FormatDriver", "Layout", "drivers", "get_driver", "open_image", "probe"]

PROBE_BYTES = 64 * 1024


@cache
def drivers() -> dict[str, FormatDriver]:
    found: dict[str, FormatDriver] = {}
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        driver = getattr(module, "DRIVER", None)
        if driver is not None:
            found[driver.name] = driver
    return found


def get_driver(name: str) -> FormatDriver:
    try:
        return drivers()[name.lower()]
    except KeyError:
        known = ", ".join(sorted(drivers()))
        raise UnsupportedFormatError(None, f"unknown format {name!r} (known: {known})") from None


def probe(reader: RangeReader) -> FormatDriver:
    """Pick the driver whose magic matches; RAW is the fallback for anything else."""
    head = reader.read(0, min(PROBE_BYTES, reader.size))
    candidates = [d for d in drivers().values() if d.name != "raw" and d.probe(head, reader.size)]
    if len(candidates) > 1:  # the most specific driver sorts first via its probe_priority
        candidates.sort(key=lambda d: -getattr(d, "probe_priority", 0))
    if candidates:
        return candidates[0]
    if reader.size >= 512:
        tail = reader.read(reader.size - 512, 512)
        for d in drivers().values():
            if d.probe_tail(tail, reader.size):
                return d
    return get_driver("raw")


def open_image(path: str | os.PathLike, fmt: str | None = None) -> DiskImage:
    """Open a local image file, probing its format unless ``fmt`` is given."""
    reader = FileRangeReader(path)
    try:
        driver = get_driver(fmt) if fmt else probe(reader)
        return driver.open(reader)
    except FormatError:
        reader.close()
        raise
    except Exception as exc:  # a driver bug must still name the file, not dump a traceback
        reader.close()
        raise FormatError(os.fspath(path), f"cannot be opened: {exc}") from exc


def extension_for(name: str) -> str:
    driver = get_driver(name)
    return driver.extensions[0] if driver.extensions else f".{driver.name}"
