"""Block maps (hypersdk.blockmap) kept as objects in the export bucket, not on a worker.

Any worker may run the next export of an instance, so the map of each exported point lives next
to the exports: ``<prefix>/maps/<instance id>/<disk>/<change id>.bmap``. A map is at most
MAX_BLOCKS hashes (32 MiB); it passes through a private temporary file only because BlockMap's
reader (which checks every field and bounds memory by the real size) reads files.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from hypersdk.blockmap import _HEAD, _MAX_META, MAX_BLOCKS, BlockMap
from hypersdk.errors import FormatError, InvalidParameterError
from hypersdk.names import is_export_id, safe_component
from hypersdk.references import printable

KEEP_MAPS = 8  # per disk: an older change id falls back to a full export
MAX_MAP_OBJECT = _HEAD.size + _MAX_META + MAX_BLOCKS * 8


def map_key(prefix: str, instance_id: str, disk: str, change_id: str) -> str:
    if not is_export_id(change_id):
        raise InvalidParameterError(f"change id {printable(change_id)[:80]!r} is malformed")
    return f"{prefix}/maps/{instance_id}/{safe_component(disk, 'disk name')}/{change_id}.bmap"


def save_map(bucket: Any, key: str, bmap: BlockMap) -> None:
    with tempfile.TemporaryDirectory(prefix="hsdk-gcp-map-") as tmp:
        path = Path(tmp) / "map"
        bmap.save(path)
        bucket.blob(key).upload_from_filename(str(path), content_type="application/octet-stream")


def load_map(bucket: Any, key: str) -> BlockMap | None:
    """The map under ``key``, None if there is none; FormatError if it is not a map."""
    blob = bucket.get_blob(key)
    if blob is None:
        return None
    where = f"gs://{bucket.name}/{key}"
    if (blob.size or 0) > MAX_MAP_OBJECT:
        raise FormatError(where, "block map object is larger than any map")
    with tempfile.TemporaryDirectory(prefix="hsdk-gcp-map-") as tmp:
        path = Path(tmp) / "map"
        # this generation only: a bigger object written since cannot grow what is read
        pinned = bucket.blob(key, generation=blob.generation)
        path.write_bytes(pinned.download_as_bytes()[:MAX_MAP_OBJECT])
        try:
            return BlockMap.load(path)
        except FormatError as exc:
            raise FormatError(where, exc.problem) from None


def prune_maps(bucket: Any, prefix: str, instance_id: str, disk: str, keep: set[str]) -> None:
    """Drop a disk's oldest maps beyond KEEP_MAPS (change ids sort by time)."""
    folder = map_key(prefix, instance_id, disk, "x").rsplit("/", 1)[0] + "/"
    names = sorted(
        b.name
        for b in bucket.client.list_blobs(bucket, prefix=folder)
        if is_export_id(b.name[len(folder) :].removesuffix(".bmap"))
    )
    for name in names[:-KEEP_MAPS]:
        if name[len(folder) :].removesuffix(".bmap") not in keep:
            with contextlib.suppress(Exception):
                bucket.delete_blob(name)
