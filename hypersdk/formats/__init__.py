"""Format registry: every module in this package that defines ``DRIVER`` (or a list of them,
``DRIVERS``) is a format.

Adding a format means adding one module (and its tests); nothing here changes. Drivers of kind
"refused" (``refused.py``) are formats recognised but not read: probing finds them like any
other, so their magic is refused by name instead of being read as raw, and naming one
(``-f qed``) gives the same refusal. They are not listed among the known formats.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache

from hypersdk.errors import FormatError, InvalidParameterError, UnsupportedFormatError
from hypersdk.formats.base import DiskImage, FormatDriver, Layout
from hypersdk.io import FileRangeReader, RangeReader
from hypersdk.references import ReferencePolicy, reference_policy

__all__ = [
    "DiskImage",
    "FormatDriver",
    "Layout",
    "drivers",
    "get_driver",
    "open_image",
    "output_driver",
    "output_formats",
    "probe",
]

PROBE_BYTES = 64 * 1024
REFUSED = "refused"  # the kind of a recognised-but-unread format (hypersdk.formats.refused)


@cache
def _all_drivers() -> tuple[FormatDriver, ...]:
    found: list[FormatDriver] = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        driver = getattr(module, "DRIVER", None)
        found += [driver] if driver is not None else []
        found += getattr(module, "DRIVERS", ())
    return tuple(found)


@cache
def drivers() -> dict[str, FormatDriver]:
    """The formats read (and mostly written) here, by name."""
    return {d.name: d for d in _all_drivers() if d.kind != REFUSED}


@cache
def _by_name() -> dict[str, FormatDriver]:
    """Every name a driver answers to: its own and its aliases (qemu-img's names)."""
    every = {d.name: d for d in _all_drivers()}
    names = {alias: d for d in every.values() for alias in d.aliases}
    return names | every


def get_driver(name: str) -> FormatDriver:
    driver = _by_name().get(name.lower())
    if driver is None:
        known = ", ".join(sorted(drivers()))
        raise UnsupportedFormatError(None, f"unknown format {name!r} (known: {known})")
    if driver.kind == REFUSED:
        refusal = driver.refusal()  # type: ignore[attr-defined]
        raise UnsupportedFormatError(None, f"format {name!r} is {refusal}")
    return driver


OUTPUT_KINDS = ("disk", "package")


def output_formats() -> list[str]:
    """The formats a user can ask for as an output (``-O``, a flow's ``format``)."""
    return sorted(n for n, d in drivers().items() if d.can_write and d.kind in OUTPUT_KINDS)


def output_driver(name: str) -> FormatDriver:
    """The driver of an output format the user asked for, or InvalidParameterError saying why
    it is not one (unknown, read-only, or the repository's own delta format)."""
    try:
        driver = get_driver(name)
    except UnsupportedFormatError as exc:  # a wrong name is a usage mistake (exit 2)
        if name.lower() in _by_name():  # a format we know and refuse: say why
            raise InvalidParameterError(exc.problem) from None
        known = ", ".join(output_formats())
        raise InvalidParameterError(f"unknown format {name!r} (known: {known})") from None
    if driver.kind == "delta":
        raise InvalidParameterError(
            f"format {name!r} is the backup repository's delta format, not an output format "
            "(incrementals are written in it automatically)"
        )
    if not driver.can_write or driver.kind not in OUTPUT_KINDS:
        raise InvalidParameterError(f"format {name!r} can be read but cannot be written")
    return driver


def probe(reader: RangeReader) -> FormatDriver:
    """Pick the driver whose magic matches (a refused format's too); RAW is the fallback for
    anything else."""
    head = reader.read(0, min(PROBE_BYTES, reader.size))
    every = [d for d in _all_drivers() if d.name != "raw"]
    candidates = [d for d in every if d.probe(head, reader.size)]
    if len(candidates) > 1:  # the most specific driver sorts first via its probe_priority
        candidates.sort(key=lambda d: -d.probe_priority)
    if candidates:
        return candidates[0]
    if reader.size >= 512:
        tail = reader.read(reader.size - 512, 512)
        for d in every:
            if d.probe_tail(tail, reader.size):
                return d
    return get_driver("raw")


def open_image(
    path: str | os.PathLike, fmt: str | None = None, policy: ReferencePolicy | None = None
) -> DiskImage:
    """Open a local image file, probing its format unless ``fmt`` is given.

    ``policy`` says how far the image's references (backing files, extents) may reach; by
    default only into its own directory (hypersdk.references). Nested opens (a backing file's
    own backing file) inherit the policy in force."""
    with reference_policy(policy):
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
