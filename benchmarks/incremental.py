"""Incremental-backup benchmark (issue 13): a full backup of a realistic disk, then rounds of
random guest writes each followed by an incremental backup, then restores of the newest point of
the chain, all as real ``hyperctl`` processes in the default durable mode.

    python -m benchmarks.incremental [--size 2G] [--rounds 5] [--changed 0.05]
                                     [--basis disk|data] [--seed 13] [--dir /var/tmp]
                                     [--keep] [--no-strace]

1. A private HYPERSDK_HOME and PREFECT_HOME under the work directory; ``hyperctl server start``
   on a free port (stopped at the end with ``hyperctl server stop``).
2. Start-up, the fixed cost of a run: ``hyperctl backup`` of a 1 MiB VM (full, and incremental
   after one changed block) and ``hyperctl restore`` of its chain, median of 3 each after a
   warm-up. The engine columns take it off.
3. A VM with one raw disk of ``--size`` (``hypersdk.imagegen``: 30% random, 20% text-like, 50%
   holes), backed up in full into a ``file://`` repository.
4. ``--rounds`` times: ``--changed`` of the disk's 64 KiB blocks (``--basis data``: of its
   blocks holding data at the full) overwritten with random bytes at random places (seeded;
   about half land in zero areas), ``sync``, ``hyperctl backup`` again.
5. ``hyperctl restore --at latest`` of the newest point into raw and into qcow2 (compared with
   the disk by ``qemu-img compare``), and of the full alone into raw, each after a ``sync``.

Per run: wall time, peak RSS (``wait4``), the bytes ``pread`` from the VM's disk and from the
repository (counted with ``strace -f --seccomp-bpf``, which stops the process only at those
reads; ``--no-strace`` skips it), the guest bytes the export moved (its manifest's
``data_bytes``) and the bytes it added to the repository. Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._util import GiB, hyperctl, warm_cache

MiB = 1024 * 1024
BLOCK = 64 * 1024  # the local source's change-map block (hypersdk.blockmap.DEFAULT_BLOCK)
VM, TINY = "bench-vm", "tiny-vm"
# targets (issue 13)
MAX_BYTES_RATIO = 0.06  # an incremental reads and stores at most 6% of the full's bytes
MAX_WALL_RATIO = 0.10  # ... in at most 10% of the full's wall time
MAX_RSS_MIB = 300.0
WHOLE_PROCESS_FROM = 8 * GiB  # below this, speed targets are judged on engine ratios
_CLEAN = (
    "PREFECT_API_URL",
    "PREFECT_UI_URL",
    "PREFECT_PROFILE",
    "PREFECT_PROFILES_PATH",
    "HYPERSDK_PREFECT_SERVER",
    "HYPERSDK_EPHEMERAL_OWNER",
    "HYPERSDK_VERBOSE",
)
_SYSCALL = re.compile(r"^\w+\(\d+<(?P<path>[^>]*)>,.*\)\s+=\s+(?P<ret>-?\d+)")


@dataclass
class Run:
    label: str
    wall: float
    rss: float  # MiB
    reads: dict[str, int] = field(default_factory=dict)  # path -> bytes pread
    kind: str = ""
    chain: int = 0  # objects in the point's chain
    data: int = 0  # guest bytes the export moved
    stored: int = 0  # bytes this run added to the repository
    startup: float = 0.0  # the fixed cost of this kind of run

    @property
    def engine(self) -> float:
        return max(self.wall - self.startup, 0.0)

    def read_under(self, root: Path) -> int:
        prefix = str(root) + os.sep
        return sum(n for path, n in self.reads.items() if path.startswith(prefix))


class Bench:
    """The work directory, the environment of every hyperctl run, and measured runs in it."""

    def __init__(self, work: Path, port: int, trace: bool):
        self.work, self.trace = work, trace
        self.vms, self.repo, self.tiny_repo = work / "vms", work / "repo", work / "tiny-repo"
        self.env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
        self.env.update(
            HYPERSDK_HOME=str(work / "hshome"),
            PREFECT_HOME=str(work / "prefecthome"),
            HYPERSDK_PREFECT_PORT=str(port),
        )
        self._n = 0
        self.load_at_start = os.getloadavg()

    def hyperctl(self, *args: str) -> list[str]:
        return [hyperctl(), *args]

    def backup(self, vm: str, repo: Path) -> list[str]:
        return self.hyperctl("backup", vm, "-s", f"local://{self.vms}", "-t", f"file://{repo}")

    def restore(self, vm: str, repo: Path, out: Path, fmt: str, at: str = "latest") -> list[str]:
        target = f"file://{repo}"
        return self.hyperctl("restore", vm, str(out), "-t", target, "--at", at, "-O", fmt, "-q")

    def run(self, label: str, argv: list[str], trace: bool | None = None) -> Run:
        """One measured child process: wall time, peak RSS and (traced) its preads by file."""
        trace = self.trace if trace is None else trace
        self._n += 1
        prefix = self.work / "trace" / f"{self._n:03d}"
        if trace:
            prefix.parent.mkdir(exist_ok=True)
            argv = [
                "strace",
                "-f",
                "-ff",
                "-qq",
                "--seccomp-bpf",
                "-y",
                "-s0",
                "-e",
                "trace=pread64,preadv,preadv2",
                "-e",
                "signal=none",
                "-o",
                str(prefix),
                *argv,
            ]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the child and what it reaped
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(
                    f"{label}: {' '.join(argv[-12:])} failed ({proc.returncode}):\n"
                    f"{err.read().decode(errors='replace')[-3000:]}"
                )
        reads = _parse_trace(prefix) if trace else {}
        return Run(label, wall, usage.ru_maxrss / 1024, reads)

    def quiet(self, argv: list[str]) -> str:
        """An unmeasured helper command; its stdout."""
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr[-2000:]}")
        return res.stdout


def _parse_trace(prefix: Path) -> dict[str, int]:
    """Bytes read per file from strace -ff output files ``prefix.<tid>`` (then removed)."""
    reads: dict[str, int] = {}
    for path in prefix.parent.glob(prefix.name + ".*"):
        with open(path, errors="replace") as f:
            for line in f:
                m = _SYSCALL.match(line)
                if m and int(m["ret"]) > 0:
                    reads[m["path"]] = reads.get(m["path"], 0) + int(m["ret"])
        path.unlink()
    return reads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2G or 256M")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def _make_vm(bench: Bench, name: str, size: int, seed: int) -> Path:
    """A local VM with one sparse raw disk of realistic content, made in a child process (this
    one stays small: it imports nothing of ours)."""
    code = (
        "import sys; from pathlib import Path; from providers.sources.local import create_vm;"
        "from hypersdk.imagegen import write_realistic_disk;"
        "d = create_vm(Path(sys.argv[1]), sys.argv[2], {'disk0': int(sys.argv[3])});"
        "write_realistic_disk(d / 'disk0.img', int(sys.argv[3]), seed=int(sys.argv[4]))"
    )
    bench.quiet([sys.executable, "-c", code, str(bench.vms), name, str(size), str(seed)])
    disk = bench.vms / name / "disk0.img"
    warm_cache(disk)
    return disk


def change_blocks(disk: Path, count: int, rng: random.Random) -> tuple[int, int]:
    """Overwrite ``count`` distinct random 64 KiB blocks with random bytes, as guest writes do;
    returns (blocks that held data, blocks that were zeros)."""
    size = disk.stat().st_size
    picks = sorted(rng.sample(range(size // BLOCK), count))
    was_data = 0
    zero = bytes(BLOCK)
    fd = os.open(disk, os.O_RDWR)
    try:
        for b in picks:
            was_data += os.pread(fd, BLOCK, b * BLOCK) != zero
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
    finally:
        os.close(fd)
    return was_data, len(picks) - was_data


def _newest_point(repo: Path, vm: str) -> tuple[str, dict, int]:
    """(export id, manifest, bytes stored under that export) of the newest point."""
    points = sorted(p.parent for p in (repo / vm).glob("*/manifest.json"))
    newest = points[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    stored = sum(p.stat().st_size for p in newest.iterdir() if p.is_file())
    return newest.name, manifest, stored


def _backup(bench: Bench, label: str, vm: str, repo: Path, kind: str, startup: float) -> Run:
    os.sync()
    run = bench.run(label, bench.backup(vm, repo))
    export_id, manifest, stored = _newest_point(repo, vm)
    if manifest["kind"] != kind:
        raise RuntimeError(f"{label}: expected a {kind} export, got {manifest['kind']}")
    disk = manifest["disks"][0]
    run.kind, run.data, run.stored, run.startup = (
        manifest["kind"],
        disk["data_bytes"],
        stored,
        startup,
    )
    return run


def _median_wall(runs: list[Run]) -> float:
    return statistics.median(r.wall for r in runs)


def measure_startup(bench: Bench) -> dict[str, float]:
    """The fixed cost of each kind of run, on a 1 MiB VM: median of 3 after a warm-up."""
    disk = _make_vm(bench, TINY, MiB, seed=5)
    rng = random.Random("startup")
    bench.quiet(bench.backup(TINY, bench.tiny_repo))  # warm-up (the server's first runs)
    change_blocks(disk, 1, rng)
    bench.quiet(bench.backup(TINY, bench.tiny_repo))
    incr = []
    for _ in range(3):
        change_blocks(disk, 1, rng)
        incr.append(bench.run("tiny incremental", bench.backup(TINY, bench.tiny_repo)))
    full = []
    for i in range(3):
        repo = bench.work / f"tiny-full-{i}"
        full.append(bench.run("tiny full", bench.backup(TINY, repo)))
        shutil.rmtree(repo)
    out = bench.work / "tiny.raw"
    restore = []
    for _ in range(4):
        restore.append(bench.run("tiny restore", bench.restore(TINY, bench.tiny_repo, out, "raw")))
        out.unlink()
    return {
        "full": _median_wall(full),
        "incremental": _median_wall(incr),
        "restore": _median_wall(restore[1:]),
    }


def _compare(disk: Path, out: Path, fmt: str) -> None:
    res = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(disk), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        sys.exit(
            f"error: the restored {fmt} image differs from the disk (qemu-img compare exit "
            f"{res.returncode}): {res.stdout}{res.stderr}".rstrip()
        )


def _restore(bench: Bench, label: str, out: Path, fmt: str, at: str, startup: float) -> Run:
    out.unlink(missing_ok=True)
    os.sync()
    run = bench.run(label, bench.restore(VM, bench.repo, out, fmt, at))
    run.kind, run.startup = "restore", startup
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="disk size (default 2G)")
    ap.add_argument("--rounds", type=int, default=5, help="incremental backups after the full")
    ap.add_argument("--changed", type=float, default=0.05, help="fraction of blocks per round")
    ap.add_argument(
        "--basis",
        choices=("disk", "data"),
        default="disk",
        help="--changed of all the disk's blocks, or of the blocks holding data at the full",
    )
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--dir", type=Path, help="where the work directory goes (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-strace", action="store_true", help="do not count reads with strace")
    args = ap.parse_args()
    for tool in ("qemu-img",) + (() if args.no_strace else ("strace",)):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install qemu-utils strace), or see --no-strace")
    if args.size % BLOCK:
        sys.exit(f"--size must be a multiple of {BLOCK} bytes")

    work = Path(tempfile.mkdtemp(prefix="hsincr-", dir=args.dir))
    bench = Bench(work, _free_port(), trace=not args.no_strace)
    hyperctl()  # byte-compile our modules once, before anything is timed
    try:
        t0 = time.perf_counter()
        bench.quiet(bench.hyperctl("server", "start"))
        server_s = time.perf_counter() - t0
        print(f"local Prefect server up in {server_s:.1f} s", file=sys.stderr)
        startup = measure_startup(bench)
        print(f"start-up: {startup}", file=sys.stderr)
        disk = _make_vm(bench, VM, args.size, seed=42)
        full = _backup(bench, "full", VM, bench.repo, "full", startup["full"])
        full.chain = 1
        runs = [full]
        per_round = args.changed * (
            args.size // BLOCK if args.basis == "disk" else full.data // BLOCK
        )
        count = max(1, round(per_round))
        mix = []
        for i in range(1, args.rounds + 1):
            mix.append(change_blocks(disk, count, random.Random(f"{args.seed}-{i}")))
            run = _backup(
                bench, f"incremental {i}", VM, bench.repo, "incremental", startup["incremental"]
            )
            run.chain = i + 1
            runs.append(run)
            print(f"{run.label}: {run.wall:.2f} s", file=sys.stderr)
        ids = sorted(p.parent.name for p in (bench.repo / VM).glob("*/manifest.json"))
        restores = []
        for fmt in ("raw", "qcow2"):
            out = work / f"restored.{fmt}"
            r = _restore(bench, f"restore newest -> {fmt}", out, fmt, "latest", startup["restore"])
            r.chain = len(ids)
            _compare(disk, out, fmt)
            out.unlink()
            restores.append(r)
        out = work / "restored-full.raw"
        r = _restore(bench, "restore the full -> raw", out, "raw", ids[0], startup["restore"])
        r.chain = 1
        out.unlink()
        restores.append(r)
    finally:
        subprocess.run(
            bench.hyperctl("server", "stop"), env=bench.env, capture_output=True, check=False
        )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    return report(args, bench, disk, runs, restores, startup, mix, count)


def _ratio(a: float, b: float) -> float:
    """a / b; infinite when b is nothing (a disk so small that start-up is all of a run)."""
    return a / b if b > 0 else float("inf")


def report(args, bench, disk, runs, restores, startup, mix, count) -> int:
    full, incrs = runs[0], runs[1:]
    src, repo = bench.vms / VM, bench.repo
    traced = bench.trace
    print(
        f"\n{args.size / GiB:.2f} GiB raw disk (30% random, 20% text-like, 50% holes), "
        f"{full.data / MiB:,.0f} MiB of data at the full; each round overwrites {count} random "
        f"64 KiB blocks ({count * BLOCK / MiB:,.0f} MiB, {args.changed:.0%} of the "
        f"{'disk' if args.basis == 'disk' else 'data'}'s blocks; data/zero areas hit: "
        + ", ".join(f"{d}/{z}" for d, z in mix)
        + f"); durable mode; {os.cpu_count()} CPUs, load average at the start "
        + ", ".join(f"{x:.2f}" for x in bench.load_at_start)
    )
    print(
        f"start-up (1 MiB VM, median of 3): backup full {startup['full']:.2f} s, "
        f"incremental {startup['incremental']:.2f} s, restore {startup['restore']:.2f} s\n"
    )
    head = (
        f"{'run':<26}{'chain':>6}{'wall s':>8}{'engine s':>9}{'src read MiB':>13}"
        f"{'moved MiB':>10}{'stored MiB':>11}{'repo read MiB':>14}{'RSS MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in runs + restores:
        read_src = f"{r.read_under(src) / MiB:,.1f}" if traced else "-"
        read_repo = f"{r.read_under(repo) / MiB:,.1f}" if traced else "-"
        moved = f"{r.data / MiB:,.1f}" if r.kind != "restore" else "-"
        stored = f"{r.stored / MiB:,.1f}" if r.kind != "restore" else "-"
        print(
            f"{r.label:<26}{r.chain:>6}{r.wall:>8.2f}{r.engine:>9.2f}{read_src:>13}"
            f"{moved:>10}{stored:>11}{read_repo:>14}{r.rss:>8.0f}"
        )

    whole = args.size >= WHOLE_PROCESS_FROM
    judged = "whole process" if whole else "engine"
    changed = count * BLOCK
    checks: list[tuple[str, str, bool]] = []

    def check(name: str, value: float, limit: float, note: str = "") -> None:
        checks.append((name, f"{value:.3f} (<= {limit:.2f}){note}", value <= limit))

    check(
        "incremental stored / full's", max(r.stored for r in incrs) / full.stored, MAX_BYTES_RATIO
    )
    check("incremental moved / full's", max(r.data for r in incrs) / full.data, MAX_BYTES_RATIO)
    if traced:
        src_ratio = max(r.read_under(src) for r in incrs) / max(full.read_under(src), 1)
        check(
            "incremental source read / full's", src_ratio, MAX_BYTES_RATIO, "  change scan included"
        )
    wall = max(r.wall for r in incrs) / full.wall
    engine = _ratio(max(r.engine for r in incrs), full.engine)
    check(
        "incremental time / full's",
        wall if whole else engine,
        MAX_WALL_RATIO,
        f"  {judged}; whole process {wall:.3f}, engine {engine:.3f}",
    )
    newest = restores[0]
    rw, re_ = newest.wall / full.wall, _ratio(newest.engine, full.engine)
    check(
        f"restore of the {newest.chain}-point chain / full",
        rw if whole else re_,
        1.0,
        f"  {judged}; whole process {rw:.3f}, engine {re_:.3f}",
    )
    peak = max(r.rss for r in runs + restores)
    checks.append(
        ("peak RSS of any run", f"{peak:.0f} MiB (< {MAX_RSS_MIB:.0f})", peak < MAX_RSS_MIB)
    )
    print()
    for name, value, ok in checks:
        print(f"{name:<36}{'PASS' if ok else 'FAIL'}  {value}")
    print(
        f"\nfloor: the bytes changed per round are {changed / full.stored:.3f} of the full's "
        f"stored bytes; an incremental stored {max(r.stored for r in incrs) / changed:.4f}x "
        "the bytes changed"
    )
    print(
        "src read: bytes pread from the VM's disk (strace), the change scan included (a local "
        "raw disk has no CBT: the scan hashes every allocated byte); moved: the guest bytes the "
        "export read and stored (manifest data_bytes); stored: bytes added to the repository; "
        "repo read: bytes pread from the repository (the export's verify; the restore's verify "
        "and reads); engine: wall time less the run kind's start-up; speed targets are judged "
        f"on the engine ratio below {WHOLE_PROCESS_FROM // GiB} GiB, on the whole process from "
        "there; every restored image of the newest point checked with qemu-img compare. "
        f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
