"""vSphere data path benchmark against vcsim (https on 127.0.0.1): download MB/s of a 1 GiB disk
with 1 and 4 range workers, and bytes moved by a 5% incremental (CBT) next to a full.

    python -m benchmarks.vsphere [--size-mib 1024] [--changed 0.05]

Reads go the way the pipeline reads: 4 MiB pieces through hypersdk.io.read_ahead, each piece
split across the reader's workers. The disk is incompressible random data.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hypersdk.io import IO_CHUNK, read_ahead

MiB = 1024 * 1024
BS = 64 * 1024


def _download(src, snap, extents) -> tuple[float, int]:
    reader = src.open_disk(snap, snap.disks[0].disk)
    try:
        started = time.perf_counter()
        n = 0
        for _piece, data in read_ahead(reader, extents.split(IO_CHUNK)):
            n += len(data)
        return time.perf_counter() - started, reader.bytes_fetched
    finally:
        reader.close()


def main(argv: list[str] | None = None) -> dict:
    from providers import open_source
    from tests.fixtures.vcsim import reconfigure, start_vcsim

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--changed", type=float, default=0.05)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    vm = "DC0_H0_VM0"
    server = start_vcsim()
    results: dict = {"disk_bytes": size, "transport": "https (TLS, 127.0.0.1)"}
    try:
        reconfigure(server, vm, disk_size=size)
        flat = server.flat_file(vm)
        rng = np.random.default_rng(1)
        with open(flat, "wb") as f:
            for _ in range(0, size, 64 * MiB):
                f.write(rng.bytes(64 * MiB))
        for workers in (1, 4):
            with open_source(server.source_url(), **server.options(workers=workers)) as src:
                if workers == 1:
                    src.enable_cbt(vm)
                with src.snapshot(vm) as snap:
                    full = src.changed_extents(snap, snap.disks[0].disk, None)
                    seconds, fetched = _download(src, snap, full.extents)
                    assert fetched == size
                    results[f"download_{workers}_workers_MBps"] = round(size / seconds / 1e6, 1)
                    base_change = full.change_id
        # 5% of the 64 KiB blocks rewritten by the "guest"
        blocks = size // BS
        pick = rng.choice(blocks, int(blocks * args.changed), replace=False)
        with open(flat, "r+b") as f:
            for b in sorted(pick):
                f.seek(int(b) * BS)
                f.write(rng.bytes(BS))
        with (
            open_source(server.source_url(), **server.options(workers=4)) as src,
            src.snapshot(vm) as snap,
        ):
            t0 = time.perf_counter()
            delta = src.changed_extents(snap, snap.disks[0].disk, base_change)
            cbt_s = time.perf_counter() - t0
            seconds, fetched = _download(src, snap, delta.extents)
        results.update(
            incremental_changed_blocks=len(pick),
            incremental_extents=len(delta.extents),
            incremental_bytes_moved=fetched,
            incremental_fraction=round(fetched / size, 4),
            incremental_cbt_query_s=round(cbt_s, 3),
            incremental_download_s=round(seconds, 2),
        )
        assert fetched == len(pick) * BS
    finally:
        server.stop()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
