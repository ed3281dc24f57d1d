"""Azure half of benchmarks/clouds: MB/s of a disk export from Azurite next to Azurite's own
raw download of the same bytes.

``run(size_bytes)`` starts Azurite, the page-diff proxy and the ARM fake (tests/azure_mgmt),
writes a disk of incompressible data as guest writes, then measures:

* ``export_MBps``: the source's data path as the pipeline drives it: incremental snapshot
  (ARM fake), read access (SAS), page ranges of the snapshot, then every range read through
  hypersdk.io.read_ahead in 4 MiB pieces by the reader's 4 parallel ranged GETs, via the proxy;
  ``export_read_MBps`` is the ranged reads alone, ``export_setup_s`` the rest (grants, page
  ranges, revoke: fixed costs, a few ARM round trips);
* ``raw_direct_MBps``: azure-storage-blob's own download of the same snapshot straight from
  Azurite (4 connections), the emulator's ceiling;
* ``raw_via_proxy_MBps``: the same download through the proxy the export goes through, the fair
  comparison for the ratio (the proxy is test equipment, not part of a real Azure path).
"""

from __future__ import annotations

import os
import time

MiB = 1024 * 1024


def _raw_download(url: str, credential) -> float:
    from azure.storage.blob import BlobClient

    blob = BlobClient.from_blob_url(url, credential=credential, max_chunk_get_size=4 * MiB)
    started = time.perf_counter()
    stream = blob.download_blob(max_concurrency=4)
    n = sum(len(chunk) for chunk in stream.chunks())
    seconds = time.perf_counter() - started
    return n / seconds / 1e6


def run(size_bytes: int) -> dict:
    """Measure one disk of ``size_bytes`` (a multiple of 512); returns the numbers as a dict."""
    from hypersdk.io import IO_CHUNK, read_ahead
    from providers import open_source
    from tests.azure_mgmt.arm import CONTAINER
    from tests.fixtures.azure_mgmt import start_cloud
    from tests.fixtures.azurite import ACCOUNT, KEY, start_azurite

    if size_bytes <= 0 or size_bytes % 512:
        raise ValueError("size_bytes must be a positive multiple of 512")
    azurite = start_azurite()
    cloud = None
    saved = {k: os.environ.get(k) for k in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER")}
    try:
        cloud = start_cloud(azurite)
        os.environ.update(cloud.arm.identity_env())
        sub = cloud.arm.add_subscription()
        cloud.arm.add_resource_group(sub, "bench")
        cloud.arm.add_vm(sub, "bench", "bench-vm", {"bench-os": size_bytes})
        rng = __import__("numpy").random.default_rng(1)
        for off in range(0, size_bytes, 4 * MiB):
            cloud.arm.write(
                sub, "bench", "bench-os", off, rng.bytes(min(4 * MiB, size_bytes - off))
            )
        url = cloud.source_url(sub, "bench", poll_interval=0.05)
        with open_source(url) as src:
            snap = src.create_snapshot("bench-vm")
            disk = snap.disks[0].disk
            started = time.perf_counter()
            changes = src.changed_extents(snap, disk, None)
            reader = src.open_disk(snap, disk, changes.extents)
            reading = time.perf_counter()
            try:
                moved = sum(len(d) for _, d in read_ahead(reader, changes.extents.split(IO_CHUNK)))
                read_s = time.perf_counter() - reading
            finally:
                reader.close()
            export_s = time.perf_counter() - started
            src.remove_snapshot(snap)
            blob_snapshot = cloud.arm.snapshot(sub, "bench", snap.provider_data["snapshots"]["os"])
        assert moved == size_bytes, (moved, size_bytes)
        path = f"{CONTAINER}/{blob_snapshot['_blob']}?snapshot={blob_snapshot['_snapshot']}"
        cred = {"account_name": ACCOUNT, "account_key": KEY}
        direct = _raw_download(f"{azurite.account_url}/{path}", cred)
        via_proxy = _raw_download(f"{cloud.arm.blob_url}/{path}", cred)
        export = size_bytes / export_s / 1e6
        return {
            "cloud": "azure",
            "emulator": "Azurite (page blob snapshot) + ARM REST fake",
            "disk_bytes": size_bytes,
            "export_MBps": round(export, 1),
            "export_s": round(export_s, 2),
            "export_read_MBps": round(size_bytes / read_s / 1e6, 1),
            "export_setup_s": round(export_s - read_s, 2),
            "raw_direct_MBps": round(direct, 1),
            "raw_via_proxy_MBps": round(via_proxy, 1),
            "ratio_vs_raw_via_proxy": round(export / via_proxy, 3),
            "ratio_vs_raw_direct": round(export / direct, 3),
            "export_includes": "snapshot + grant + page ranges + ranged GETs (4 workers) + revoke",
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cloud is not None:
            cloud.stop()
        azurite.stop()


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 64 * MiB), indent=2))
