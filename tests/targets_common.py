"""What every cloud-target test does: make a disk, stream an export into a target, read it back
in odd-sized ranged pieces (so range clamping and piece joins are exercised)."""

from __future__ import annotations

from pathlib import Path

from hypersdk.convert import convert_stream, scan_data_extents
from hypersdk.formats import open_image
from hypersdk.imagegen import write_realistic_disk

MiB = 1024 * 1024
SIZE = 40 * MiB
ODD_CHUNK = 3 * MiB + 17


def make_disk(directory: Path, seed: int) -> Path:
    path = directory / "disk.raw"
    write_realistic_disk(path, SIZE, seed=seed)
    return path


def export(target, key: str, disk, fmt: str = "raw") -> int:
    """Stream ``disk`` as ``fmt`` into ``target`` under ``key``; the bytes written."""
    with open_image(disk, "raw") as image:
        extents = scan_data_extents(image, image.extents())
        with target.open_writer(key, image.size) as w:
            convert_stream(image, fmt, w, extents)
            return w.tell()


def read_back(target, key: str, chunk: int = ODD_CHUNK) -> bytes:
    r = target.open_reader(key)
    try:
        return b"".join(r.read(o, min(chunk, r.size - o)) for o in range(0, r.size, chunk))
    finally:
        r.close()


def download(target, key: str, dst, chunk: int = ODD_CHUNK) -> None:
    """Read back into a local file with ranged reads in odd-sized pieces (bounded memory)."""
    r = target.open_reader(key)
    try:
        with open(dst, "wb") as f:
            for off in range(0, r.size, chunk):
                f.write(r.read(off, min(chunk, r.size - off)))
    finally:
        r.close()
