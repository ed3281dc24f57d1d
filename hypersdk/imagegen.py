"""Realistic synthetic disk content for the demo VM, tests and benchmarks.

A disk is cut into 1 MiB regions; each is random (compressed/encrypted data), text-like (logs,
configs: compressible) or left as a hole (zeros), in proportions a real guest shows. Zero runs
also appear inside data regions, so zero detection at cluster granularity matters.
"""

from __future__ import annotations

import os

import numpy as np

REGION = 1024 * 1024
_WORDS = (
    b"kernel systemd started session user root daemon error warning info network eth0 disk "
    b"mount filesystem ext4 journal write read block cache memory cpu process thread service "
    b"config value enabled disabled true false http request response GET POST 200 404 500 "
).split()


def _text_region(rng: np.random.Generator, size: int) -> bytes:
    words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size // 5)]
    lines = []
    total = 0
    stamp = int(rng.integers(1_600_000_000, 1_800_000_000))
    while total < size:
        n = int(rng.integers(4, 14))
        line = (
            b"%d " % stamp + b" ".join(words[total % len(words) : total % len(words) + n]) + b"\n"
        )
        stamp += int(rng.integers(0, 3))
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def write_realistic_disk(
    path: str | os.PathLike,
    size: int,
    seed: int = 1,
    random_fraction: float = 0.30,
    text_fraction: float = 0.20,
) -> None:
    """Create a sparse raw disk of ``size`` bytes (the rest stays as holes, reading as zeros)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, REGION):
            length = min(REGION, size - start)
            kind = rng.random()
            if kind < random_fraction:
                data = bytearray(rng.bytes(length))
            elif kind < random_fraction + text_fraction:
                data = bytearray(_text_region(rng, length))
            else:
                continue
            if rng.random() < 0.3:  # a zero run inside data, 64 KiB aligned
                zstart = int(rng.integers(0, max(1, length // 65536))) * 65536
                data[zstart : zstart + 65536] = bytes(len(data[zstart : zstart + 65536]))
            f.seek(start)
            f.write(data)


def mutate_disk(
    path: str | os.PathLike, blocks: int, seed: int, block: int = 64 * 1024
) -> list[int]:
    """Overwrite ``blocks`` random 64 KiB blocks (simulated guest writes); returns their offsets."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    offsets = sorted({int(x) * block for x in rng.integers(0, max(1, size // block), blocks)})
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(rng.bytes(min(block, size - off)))
    return offsets
