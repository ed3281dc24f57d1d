"""Shared benchmark helpers: timed subprocesses with their own peak RSS, test images."""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def best_of(n: int, argv: list[str], cleanup: list[Path] = (), env: dict | None = None):
    """Best wall time of ``n`` runs (each after a sync, outputs removed, so dirty pages of one
    contender don't slow the next), with the peak RSS of that run."""
    best = None
    for _ in range(n):
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        os.sync()
        result = run_measured(argv, env)
        if best is None or result[0] < best[0]:
            best = result
    return best


def best_interleaved(rounds: int, contenders: list[tuple[list[str], list[Path]]]):
    """Best (wall, RSS, stdout) of each contender over ``rounds`` round-robin rounds.

    Interleaving spreads the machine's slow phases (page-cache writeback of earlier runs) over
    every contender instead of penalising whoever runs after the heaviest writer.
    """
    best: list = [None] * len(contenders)
    n = len(contenders)
    for r in range(rounds):
        # a new order every round (seeded, so repeatable): on this VM a run is slowed or sped up
        # by what the previous one left behind (freed page cache, pending discards), so no
        # contender may always follow the same one
        order = list(range(n))
        random.Random(r).shuffle(order)
        for i in order:
            argv, cleanup = contenders[i]
            result = best_of(1, argv, cleanup)
            if best[i] is None or result[0] < best[i][0]:
                best[i] = result
    return best


def back_to_back(rounds: int, contenders: list[list[str]]):
    """Median (wall, RSS, stdout) of each contender run the way a user runs a tool again and
    again: ``rounds`` runs in a row, each writing over the previous run's output, with no
    removal and no sync in between, so whatever a run left behind (dirty pages, an output to
    replace) weighs on the next, as it does for users. Each contender's block starts after a
    sync and one uncounted run that makes its output exist; blocks go in a seeded order."""
    import statistics

    out: list = [None] * len(contenders)
    order = list(range(len(contenders)))
    random.Random(len(contenders) + rounds).shuffle(order)
    for i in order:
        os.sync()
        run_measured(contenders[i])  # the output now exists, as it does for a user
        runs = sorted((run_measured(contenders[i]) for _ in range(rounds)), key=lambda x: x[0])
        mid = runs[len(runs) // 2]
        out[i] = (statistics.median(x[0] for x in runs), max(x[1] for x in runs), mid[2])
    return out


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process, via wait4's rusage."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return wall, usage.ru_maxrss / 1024, out.decode()


def realistic_image(directory: Path, size: int = 2 * GiB, name: str = "bench.raw") -> Path:
    """The benchmark image: 30% random, 20% text-like, 50% zeros (sparse); made once, reused.

    Made in a child process so this process stays small: a forked child's peak RSS starts from
    its parent's, which would distort the measurements.
    """
    path = directory / name
    marker = path.with_name(path.name + f".made-{size}")
    if not marker.exists():
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from hypersdk.imagegen import write_realistic_disk;"
                " write_realistic_disk(sys.argv[1], int(sys.argv[2]), seed=42)",
                str(path),
                str(size),
            ],
            check=True,
        )
        marker.touch()
    warm_cache(path)
    return path


def warm_cache(path: Path) -> None:
    """Read a file once in 4 MiB pieces (bounded memory) so every contender starts warm."""
    buf = bytearray(4 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def python() -> str:
    return sys.executable


@functools.cache
def hyperctl() -> str:
    """The venv's ``hyperctl``, with our modules byte-compiled first (once per benchmark run): an
    editable install has no .pyc until first import, and with PYTHONDONTWRITEBYTECODE set it
    would recompile every run."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("hypersdk", "providers", "flows", "tasks"):
        compileall.compile_dir(root / package, quiet=1)
    return str(Path(sys.executable).with_name("hyperctl"))
