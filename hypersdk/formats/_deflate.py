"""Deflate for the format writers that compress (qcow2 clusters, VMDK grains).

Through a ``compressobj``, not ``zlib.compress``: the bytes are the same, but on Python 3.11 the
one-shot function holds the GIL while it deflates and a compressobj releases it, which is what
lets two threads use two cores.
"""

from __future__ import annotations

import zlib


def deflate(data: bytes | memoryview, level: int, wbits: int = zlib.MAX_WBITS) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def worth_deflating(sample: bytes | memoryview, wbits: int = zlib.MAX_WBITS) -> bool:
    """False for random or encrypted data: a 1-in-16 byte sample of a cluster that does not
    shrink at level 1 saves the costly full deflate (qemu tries them all)."""
    return len(deflate(sample, 1, wbits)) < len(sample) * 0.97
