"""Local pipeline benchmark: 2 GiB realistic image, each stage's MB/s, end to end, peak RSS,
next to `qemu-img convert -O qcow2` of the same image in the same run.

    python -m benchmarks.pipeline [--size-gib 2] [--dir /var/tmp/hsbench]

Runs with a warm page cache (the image was just written or read); every command sees the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._util import GiB, best_interleaved, hyperctl, python, realistic_image


def pipeline_child(vm_root: str, target: str) -> None:
    """One export through the engine, as the flow's tasks do it, minus Prefect."""
    from hypersdk.manifest import DiskManifest, ExportManifest
    from hypersdk.pipeline import export_stream
    from providers import open_source, open_target

    t0 = time.perf_counter()
    src = open_source(vm_root)
    snap = src.create_snapshot("bench-vm")
    t_snap = time.perf_counter()
    disk = snap.disks[0].disk
    changes = src.changed_extents(snap, disk, None)
    t_cbt = time.perf_counter()
    tgt = open_target(target)
    key = f"bench-vm/{snap.id}/disk0.qcow2"
    tracker = src.change_tracker(snap, disk, changes)  # the block map, from the export's reads
    with src.open_disk(snap, disk) as reader, tgt.open_writer(key) as writer:
        res = export_stream(
            reader, changes.extents, True, "qcow2", writer, observers=[tracker] if tracker else ()
        )
    if tracker:
        tracker.commit()
    t_export = time.perf_counter()
    manifest = ExportManifest(
        export_id=snap.id,
        kind="full",
        source=vm_root,
        vm=snap.vm,
        snapshot_id=snap.id,
        snapshot_consistency=snap.consistency,
        disks=[
            DiskManifest(
                name="disk0",
                virtual_size=res.virtual_size,
                format="qcow2",
                key=key,
                object_size=res.object_size,
                object_blake3=res.object_blake3,
                data_bytes=res.data_bytes,
                defined_bytes=res.defined_bytes,
                chunks=res.chunks,
                chunk_size=res.chunk_size,
            )
        ],
    )
    tgt.put_bytes(f"bench-vm/{snap.id}/manifest.json", manifest.to_json())
    src.remove_snapshot(snap)
    t_end = time.perf_counter()
    print(
        json.dumps(
            {
                "snapshot_s": t_snap - t0,
                "cbt_s": t_cbt - t_snap,
                "export_s": t_export - t_cbt,
                "manifest_s": t_end - t_export,
                "total_s": t_end - t0,
                "virtual": res.virtual_size,
                "data": res.data_bytes,
                "object": res.object_size,
                "stages": {k: v.as_dict() for k, v in res.stages.items()},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument(
        "--dir", default=None, help="work directory (default: a temp dir, removed after)"
    )
    ap.add_argument("--runs", type=int, default=3, help="best of N runs per contender")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        pipeline_child(*args.child)
        return
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is needed as the speed anchor (apt-get install qemu-utils)")
    work = Path(args.dir or tempfile.mkdtemp(prefix="hsbench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB)
    try:
        from providers.sources.local import create_vm

        vm_dir = work / "vms" / "bench-vm"
        if not (vm_dir / "vm.json").exists():
            create_vm(work / "vms", "bench-vm", {"disk0": size})
        image = realistic_image(vm_dir, size, name="disk0.img")

        q_out, h_out, exports = work / "qemu.qcow2", work / "ours.qcow2", work / "exports"

        def qemu(mode: str) -> list[str]:
            return [
                "qemu-img",
                "convert",
                "-t",
                mode,
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(image),
                str(q_out),
            ]

        def ours(mode: str) -> list[str]:
            return [hyperctl(), "convert", "-t", mode, str(image), str(h_out), "-O", "qcow2", "-q"]

        def pipeline(mode: str) -> list[str]:
            target = f"file://{exports.resolve()}?cache={mode}"
            return [python(), "-m", "benchmarks.pipeline", "--child", str(work / "vms"), target]

        # Like for like: qemu-img's default (-t unsafe: page cache, no flush) against ours in the
        # same mode, and the durable mode (-t none: O_DIRECT, then flush) against ours, the
        # default of hyperctl and of the flows' local target (?cache=none).
        results = best_interleaved(
            args.runs,
            [
                (qemu("unsafe"), [q_out]),
                (ours("unsafe"), [h_out]),
                (pipeline("unsafe"), [exports]),
                (qemu("none"), [q_out]),
                (ours("none"), [h_out]),
                (pipeline("none"), [exports]),
            ],
        )
        (qu, qu_rss, _), (hu, hu_rss, _), (pu, pu_rss, _) = results[:3]
        (qn, qn_rss, _), (hn, hn_rss, _), (pw, p_rss, out) = results[3:]
        rows = [
            ("qemu-img convert -t unsafe (its default)", qu, qu_rss, qu),
            ("hyperctl convert -t unsafe", hu, hu_rss, qu),
            ("pipeline, target ?cache=unsafe", pu, pu_rss, qu),
            ("qemu-img convert -t none (durable)", qn, qn_rss, qn),
            ("hyperctl convert (-t none, durable)", hn, hn_rss, qn),
            ("pipeline, durable (the flows' default)", pw, p_rss, qn),
        ]
        detail = json.loads(out)

        print(
            f"\nimage: {size / GiB:.1f} GiB virtual, {detail['data'] / 2**20:,.0f} MiB of data, warm cache, "
            f"best of {args.runs} interleaved rounds\n"
        )
        print(f"{'command':<48}{'wall s':>8}{'MB/s':>9}{'x qemu':>8}{'peak RSS MiB':>14}")
        for name, wall, rss, anchor in rows:
            print(
                f"{name:<48}{wall:>8.2f}{size / wall / 1e6:>9,.0f}{wall / anchor:>8.2f}{rss:>14.0f}"
            )
        print("(x qemu: against qemu-img in the same cache mode)")
        print("\npipeline stages (in-process, MB/s over the bytes each stage handled):")
        print(f"  snapshot      {detail['snapshot_s']:.3f} s")
        print(
            f"  change scan   {detail['cbt_s']:.2f} s  ({size / detail['cbt_s'] / 1e6:,.0f} MB/s of disk;"
            " a full export probes for data, its block map is built from the export's reads)"
        )
        for name, st in detail["stages"].items():
            rate = st["bytes"] / st["seconds"] / 1e6 if st["seconds"] else float("inf")
            print(f"  {name:<12}  {st['seconds']:.2f} s busy  ({rate:,.0f} MB/s)")
        print(
            f"  export total  {detail['export_s']:.2f} s  ({size / detail['export_s'] / 1e6:,.0f} MB/s of disk)"
        )
        print(f"  manifest      {detail['manifest_s']:.3f} s")
        print(f"  end to end    {detail['total_s']:.2f} s\n")
        print(
            "pipeline = snapshot, change scan, convert, block map, manifest (stages below from "
            "the durable run)\n"
            "targets: hyperctl convert <= 1.00x qemu; pipeline <= 2.00x qemu; peak RSS < 300 MiB"
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
