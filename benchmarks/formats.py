"""Format benchmark: `hyperctl convert` next to `qemu-img convert`, every target format we write,
on the same 2 GiB realistic image (30% random, 20% text-like, 50% holes), in the same run.

    python -m benchmarks.formats [--size-gib 2] [--dir /var/tmp/hsbench] [--runs 3]
                                 [--formats qcow2c,vhd] [--cache unsafe]

Like for like: both tools read the same warm raw image (``-f raw``) and write with the same
``-t`` cache mode (default ``unsafe``, qemu-img convert's own default: page cache, no flush).
By default each tool runs back to back, as a user runs it: ``--runs`` runs in a row, every run
writing over its previous output, no removal, no sync in between (median, after one uncounted
run that makes the output exist; a sync before each tool's block, so one tool's dirty pages do
not throttle the other's). ``--fresh`` measures the other way: best of ``--runs``,
outputs removed and ``sync`` before every run, so the machine's slow page-cache phases hit
both alike. Our output of every
format is checked once with ``qemu-img compare`` against the source: a fast wrong result aborts
the benchmark instead of being reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks._util import GiB, back_to_back, best_interleaved, hyperctl, realistic_image
from hypersdk.atomic import CACHE_MODES

TARGET_PLAIN, TARGET_COMPRESSED = 1.00, 0.67


@dataclass(frozen=True)
class Case:
    key: str  # --formats name
    label: str
    ext: str
    ours: tuple[str, ...]  # hyperctl convert arguments
    qemu_only: tuple[str, ...] | None = None  # qemu-img convert arguments, where they differ
    qemu_name: str | None = None  # qemu's name of the output format, where it differs
    compressed: bool = False

    @property
    def qemu(self) -> tuple[str, ...]:
        return self.ours if self.qemu_only is None else self.qemu_only

    @property
    def qemu_fmt(self) -> str:
        return self.qemu_name or self.ext


def _sub(fmt: str, sub: str) -> tuple[str, ...]:
    return ("-O", fmt, "-o", f"subformat={sub}")


CASES = [
    Case("raw", "raw", "raw", ("-O", "raw")),
    Case("qcow2", "qcow2", "qcow2", ("-O", "qcow2")),
    Case(
        "qcow2c",
        "qcow2 compressed (zlib)",
        "qcow2",
        ("-O", "qcow2", "-o", "compression=zlib"),
        ("-O", "qcow2", "-c"),
        compressed=True,
    ),
    Case("vmdk", "vmdk monolithicSparse", "vmdk", _sub("vmdk", "monolithicSparse")),
    Case(
        "vmdk-stream",
        "vmdk streamOptimized",
        "vmdk",
        _sub("vmdk", "streamOptimized"),
        compressed=True,
    ),
    Case("vhd", "vhd dynamic", "vhd", _sub("vhd", "dynamic"), _sub("vpc", "dynamic"), "vpc"),
    Case("vhd-fixed", "vhd fixed", "vhd", _sub("vhd", "fixed"), _sub("vpc", "fixed"), "vpc"),
    Case("vhdx", "vhdx dynamic", "vhdx", _sub("vhdx", "dynamic")),
    Case("vdi", "vdi dynamic", "vdi", ("-O", "vdi")),
]


@dataclass
class Row:
    case: Case
    q_wall: float
    h_wall: float
    q_rss: float
    h_rss: float
    q_mib: float  # allocated size of each output
    h_mib: float
    q_start: float  # each tool's start-up: its convert of a 1 MiB image
    h_start: float

    @property
    def ratio(self) -> float:
        return self.h_wall / self.q_wall

    @property
    def engine_ratio(self) -> float:
        """The ratio with each tool's fixed start-up taken off: the conversion itself."""
        return (self.h_wall - self.h_start) / max(self.q_wall - self.q_start, 1e-9)

    @property
    def target(self) -> float:
        return TARGET_COMPRESSED if self.case.compressed else TARGET_PLAIN

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


def verify(image: Path, out: Path, case: Case) -> None:
    res = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", case.qemu_fmt, str(image), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        sys.exit(
            f"error: our {case.label} output {out} differs from the source "
            f"(qemu-img compare exit {res.returncode}): {res.stdout}{res.stderr}".rstrip()
        )


def start_up(work: Path, cache: str, runs: int) -> tuple[float, float]:
    """Best wall time of each tool converting a 1 MiB image to qcow2: what a run costs before
    it converts anything (for us: the interpreter, numpy, click and our modules)."""
    tiny = work / "tiny.raw"
    with open(tiny, "wb") as f:
        f.write(os.urandom(1 << 20))
    q_out, h_out = work / "tiny-q.qcow2", work / "tiny-h.qcow2"
    (q, _, _), (h, _, _) = best_interleaved(
        runs,
        [
            (
                [
                    "qemu-img",
                    "convert",
                    "-t",
                    cache,
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    str(tiny),
                    str(q_out),
                ],
                [q_out],
            ),
            (
                [hyperctl(), "convert", "-q", "-f", "raw", "-t", cache, str(tiny), str(h_out)],
                [h_out],
            ),
        ],
    )
    for p in (tiny, q_out, h_out):
        p.unlink(missing_ok=True)
    return q, h


def allocated_mib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dir", default=None, help="work directory, reused with its image")
    ap.add_argument("--runs", type=int, default=3, help="best of N round-robin runs")
    ap.add_argument(
        "--formats",
        default=",".join(c.key for c in CASES),
        help=f"comma-separated subset of: {', '.join(c.key for c in CASES)}",
    )
    ap.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="unsafe",
        help="output cache mode -t passed to both tools (default: unsafe, qemu-img's default)",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="remove outputs and sync before every run, best of --runs (default: back to back)",
    )
    args = ap.parse_args()
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is needed as the speed anchor (apt-get install qemu-utils)")
    wanted = [k.strip() for k in args.formats.split(",") if k.strip()]
    unknown = sorted(set(wanted) - {c.key for c in CASES})
    if unknown:
        sys.exit(
            f"unknown format(s) {', '.join(unknown)}; known: {', '.join(c.key for c in CASES)}"
        )
    cases = [c for c in CASES if c.key in wanted]

    work = Path(args.dir or tempfile.mkdtemp(prefix="hsfmt-"))
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB)
    try:
        image = realistic_image(work, size)
        q_start, h_start = start_up(work, args.cache, max(5, args.runs))
        rows = []
        for case in cases:
            q_out, h_out = work / f"qemu.{case.ext}", work / f"ours.{case.ext}"
            qemu_cmd = ["qemu-img", "convert", "-t", args.cache, "-f", "raw", *case.qemu]
            qemu_cmd += [str(image), str(q_out)]
            ours_cmd = [hyperctl(), "convert", "-q", "-f", "raw", "-t", args.cache, *case.ours]
            ours_cmd += [str(image), str(h_out)]
            print(f"{case.label}: {args.runs} round(s) ...", file=sys.stderr, flush=True)
            if args.fresh:
                (q_wall, q_rss, _), (h_wall, h_rss, _) = best_interleaved(
                    args.runs, [(qemu_cmd, [q_out]), (ours_cmd, [h_out])]
                )
            else:
                (q_wall, q_rss, _), (h_wall, h_rss, _) = back_to_back(
                    args.runs, [qemu_cmd, ours_cmd]
                )
            verify(image, h_out, case)
            rows.append(
                Row(
                    case,
                    q_wall,
                    h_wall,
                    q_rss,
                    h_rss,
                    allocated_mib(q_out),
                    allocated_mib(h_out),
                    q_start,
                    h_start,
                )
            )
            q_out.unlink(missing_ok=True)
            h_out.unlink(missing_ok=True)

        data_mib = allocated_mib(image)
        print(
            f"\nimage: {size / GiB:.2f} GiB virtual, {data_mib:,.0f} MiB allocated (30% random, "
            f"20% text-like, 50% holes), warm cache; "
            + (
                f"best of {args.runs} round-robin runs, each after a sync with no output; "
                if args.fresh
                else f"median of {args.runs} back-to-back runs over the previous output; "
            )
            + f"output cache mode -t {args.cache} for both tools; start-up (a 1 MiB convert): "
            f"qemu-img {q_start:.3f} s, ours {h_start:.3f} s\n"
        )
        head = (
            f"{'format':<26}{'qemu-img s':>11}{'ours s':>9}{'ratio':>7}{'engine':>8}{'ours RSS MiB':>14}"
            f"{'qemu RSS':>10}{'out MiB q/ours':>17}{'target':>8}  result"
        )
        print(head)
        print("-" * len(head))
        misses = 0
        for r in rows:
            misses += not r.ok
            out_sizes = f"{r.q_mib:,.0f}/{r.h_mib:,.0f}"
            target = f"<={r.target:.2f}"
            print(
                f"{r.case.label:<26}{r.q_wall:>11.2f}{r.h_wall:>9.2f}{r.ratio:>7.2f}{r.engine_ratio:>8.2f}"
                f"{r.h_rss:>14.0f}{r.q_rss:>10.0f}{out_sizes:>17}{target:>8}"
                f"  {'PASS' if r.ok else 'MISS'}"
            )
        print(
            f"\nratio = ours / qemu-img wall time; engine = the same with each tool's start-up "
            f"taken off; targets (on ratio): <= {TARGET_PLAIN:.2f} uncompressed, "
            f"<= {TARGET_COMPRESSED:.2f} compressed; every output of ours verified with "
            f"qemu-img compare. {len(rows) - misses}/{len(rows)} PASS."
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
