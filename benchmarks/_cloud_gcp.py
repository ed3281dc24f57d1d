"""GCP half of benchmarks/clouds: MB/s of a disk export streamed from fake-gcs-server through the
GCP source, next to fake-gcs-server's own raw download of the same bytes.

The instance and its image export run against the Compute/Cloud Build REST fake of the tests
(tests/gcp_compute); the export object (disk.raw in a tar.gz) lands in fake-gcs-server. Measured
after the export exists (creating it is the fake's work, not ours):

- ``raw``: the disk's bytes stored as a plain object, downloaded by ranged GETs (the same
  RangedStream, so the same request size and prefetch): what the emulator itself serves.
- ``targz_download``: the export object downloaded the same way (compressed bytes, no decoding).
- ``export``: ``changed_extents`` (one streamed pass: download, gunzip, untar, hash every block)
  plus the pipeline's read of the planned extents converted to raw into a discarding sink (a
  second streamed pass): what a full backup costs on the source side.

MB/s are guest bytes (the disk size) per second; ``ratio`` = export MB/s / raw MB/s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


class _Discard:
    """A Sink that counts and drops (the target is not what is measured)."""

    def __init__(self):
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def write_zeros(self, length: int) -> None:
        self.n += length

    def tell(self) -> int:
        return self.n


def _fill(path: Path, size: int) -> None:
    from hypersdk.imagegen import write_realistic_disk

    write_realistic_disk(path, size, seed=42)


def _rate(size: int, seconds: float) -> float:
    return size / MiB / seconds if seconds > 0 else 0.0


def run(size_bytes: int = 1024**3) -> dict:
    """Measure one export of a ``size_bytes`` disk; returns MB/s figures and their ratio."""
    from hypersdk.pipeline import export_stream
    from providers import open_source
    from providers.gcp.fetch import RangedStream
    from tests.fixtures.fake_gcs import start_fake_gcs
    from tests.gcp_compute.server import FakeCompute

    size = size_bytes // 512 * 512
    gcs = start_fake_gcs()
    compute = FakeCompute("bench-project", "europe-west1-b", gcs.endpoint)
    compute.start()
    saved = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gcp-") as tmp:
            os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(compute.credentials_file(Path(tmp)))
            bucket = gcs.new_bucket()
            disk = compute.add_instance("bench1", {"bench1-disk": size})["bench1-disk"]
            _fill(disk, size)
            raw_blob = gcs.client().bucket(bucket).blob("raw/disk.raw")
            raw_blob.upload_from_filename(str(disk))
            url = (
                f"gcp://bench-project/europe-west1-b?export_bucket={bucket}"
                f"&compute_endpoint={compute.endpoint}&cloudbuild_endpoint={compute.endpoint}"
                f"&storage_endpoint={gcs.endpoint}&poll_seconds=0.05"
            )
            with open_source(url) as src:
                started = time.perf_counter()
                snap = src.create_snapshot("bench1")
                export_made = time.perf_counter() - started
                try:
                    sd = snap.disks[0].disk
                    obj = snap.provider_data["objects"][sd.name]

                    def download(blob, length: int) -> float:
                        stream = RangedStream(blob, length, src.opts.chunk_size)
                        t0 = time.perf_counter()
                        while stream.read(8 * MiB):
                            pass
                        stream.close()
                        return time.perf_counter() - t0

                    bkt = src.clients.bucket()
                    raw_s = download(gcs.client().bucket(bucket).get_blob("raw/disk.raw"), size)
                    gz_s = download(bkt.get_blob(obj["key"]), obj["size"])

                    t0 = time.perf_counter()
                    changes = src.changed_extents(snap, sd, None)
                    scan_s = time.perf_counter() - t0
                    reader = src.open_disk(snap, sd, changes.extents)
                    try:
                        t0 = time.perf_counter()
                        export_stream(reader, changes.extents, True, "raw", _Discard())
                        read_s = time.perf_counter() - t0
                    finally:
                        reader.close()
                finally:
                    src.remove_snapshot(snap)
            export_s = scan_s + read_s
            return {
                "cloud": "gcp",
                "emulator": "fake-gcs-server",
                "size_bytes": size,
                "export_object_bytes": obj["size"],
                "image_export_seconds_fake": round(export_made, 2),
                "raw_mb_s": round(_rate(size, raw_s), 1),
                "targz_download_mb_s": round(_rate(size, gz_s), 1),
                "scan_mb_s": round(_rate(size, scan_s), 1),
                "read_mb_s": round(_rate(size, read_s), 1),
                "export_mb_s": round(_rate(size, export_s), 1),
                "ratio": round(raw_s / export_s, 3) if export_s else 0.0,
                "passes": 2,
            }
    finally:
        if saved is None:
            os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        else:
            os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = saved
        with contextlib.suppress(Exception):
            compute.stop()
        gcs.stop()


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1024**3), indent=2))
