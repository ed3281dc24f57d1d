"""EBS snapshot export speed against moto: blocks/s and MB/s with 1, 4 and 16 blocks in flight,
next to moto's own GetSnapshotBlock loop timed alone (the ratio says what the source adds).

    .venv/bin/python -m benchmarks.aws [--size-mib 1024] [--workers 1,4,16]

A snapshot of ``--size-mib`` of random data (every block allocated) is staged in moto (through
the test fixture's corrected EC2 snapshots), then read whole:
- ``moto loop``: boto3 ``get_snapshot_block`` for every block, one after another, body read,
  nothing checked (the floor: what moto itself costs per block);
- ``source, N in flight``: AwsSource.open_disk over the full export's planned extents, read in
  4 MiB pieces as the pipeline reads (each block's SHA-256 verified, N fetches in flight).
moto runs in a child process (the fixture's corrections applied there, the snapshot staged
there), so the measured client does not share its GIL with the emulator: on AWS the server side
costs nothing here and more blocks in flight help much more than this shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MiB = 1024 * 1024


def _stage(moto, size_mib: int) -> tuple[str, str]:
    """An instance whose one volume holds ``size_mib`` of random blocks; its snapshot id."""
    from tests.fixtures.moto_aws import BLOCK, GUEST

    gib = max(1, -(-size_mib // 1024))
    inst = moto.make_instance("bench", [("/dev/sda1", None, gib)])
    vol = moto.volume_of(inst, "/dev/sda1")
    seed = os.urandom(BLOCK)
    for i in range(size_mib * MiB // BLOCK):
        GUEST[vol][i] = seed[i % 64 :] + seed[: i % 64]  # distinct blocks, cheap to make
    return inst["InstanceId"], vol


def _moto_loop(moto, snapshot: str) -> tuple[float, int]:
    ebs = moto.client("ebs")
    blocks = []
    token = None
    while True:
        kw = {"NextToken": token} if token else {}
        page = ebs.list_snapshot_blocks(SnapshotId=snapshot, **kw)
        blocks += page["Blocks"]
        token = page.get("NextToken")
        if not token:
            break
    start = time.perf_counter()
    n = 0
    for b in blocks:
        body = ebs.get_snapshot_block(
            SnapshotId=snapshot, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
        )["BlockData"]
        n += len(body.read())
    return time.perf_counter() - start, n


def _source_pass(url: str, instance: str, workers: int) -> tuple[float, int, str]:
    from hypersdk.io import IO_CHUNK
    from providers import open_source

    with open_source(url, workers=workers) as src:
        snap = src.create_snapshot(instance)
        try:
            disk = snap.disks[0].disk
            plan = src.changed_extents(snap, disk, None).extents
            start = time.perf_counter()
            reader = src.open_disk(snap, disk, plan)
            n = 0
            try:
                for piece in plan.split(IO_CHUNK):
                    n += len(reader.read(piece.offset, piece.length))
            finally:
                reader.close()
            return time.perf_counter() - start, n, snap.disks[0].change_id
        finally:
            src.remove_snapshot(snap)


def _serve(size_mib: int, conn) -> None:
    """The child: a corrected moto server with the staged volume; sends (endpoint, instance,
    volume), then serves until told to stop."""
    import logging

    from moto.server import ThreadedMotoServer

    from tests.fixtures.moto_aws import MotoAws, correct_moto

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    correct_moto()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        instance, vol = _stage(MotoAws(endpoint), size_mib)
        conn.send((endpoint, instance, vol))
        conn.recv()  # until the parent is done
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--workers", default="1,4,16")
    args = p.parse_args(argv)

    import multiprocessing

    from tests.fixtures.moto_aws import ACCESS_KEY, SECRET_KEY, MotoAws

    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="1",
    )
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.size_mib, child), daemon=True)
    server.start()
    try:
        endpoint, instance, vol = parent.recv()
        moto = MotoAws(endpoint)
        url = moto.source_url(backoff=0.05)
        rows = []
        snap = moto.client("ec2").create_snapshot(VolumeId=vol)["SnapshotId"]
        secs, n = _moto_loop(moto, snap)
        rows.append(("moto loop (boto3, 1 at a time)", secs, n))
        for w in (int(x) for x in args.workers.split(",")):
            secs, n, _ = _source_pass(url, instance, w)
            rows.append((f"source, {w} in flight", secs, n))
        base = rows[0][1]
        print(f"{args.size_mib} MiB snapshot ({args.size_mib * MiB // (512 * 1024)} blocks)")
        print(f"{'':34} {'seconds':>8} {'blocks/s':>9} {'MB/s':>7} {'vs moto loop':>12}")
        for label, secs, n in rows:
            blocks = n / (512 * 1024)
            print(
                f"{label:34} {secs:8.2f} {blocks / secs:9.0f} {n / secs / 1e6:7.1f} "
                f"{base / secs:11.2f}x"
            )
    finally:
        parent.send("stop")
        server.join(30)
        if server.is_alive():
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
