"""Encryption throughput: MB/s to encrypt and decrypt 1 GiB with the AES-GCM container,
with 1 and 2 sealing threads (to measure whether the thread pool helps). `python -m benchmarks.crypto`
"""

from __future__ import annotations

import os
import tempfile
import time

from hypersdk.crypto import DecryptingReader, Encryptor, KeyMaterial
from hypersdk.io import FileRangeReader, StreamSink

GiB = 1024**3
BLOCK = 4 * 1024 * 1024


class NullSink:
    def __init__(self):
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)


def run(threads: int, directory: str, size: int = GiB) -> tuple[float, float]:
    key = KeyMaterial.from_key(os.urandom(32))
    block = os.urandom(BLOCK)
    path = os.path.join(directory, f"bench-{threads}.enc")
    with open(path, "wb") as f:
        # Encrypt into the page cache (file write) to include a realistic sink.
        started = time.perf_counter()
        enc = Encryptor(key, StreamSink(f), threads=threads)
        for _ in range(size // BLOCK):
            enc.write(block)
        enc.finish()
        enc_s = time.perf_counter() - started
    with FileRangeReader(path) as reader:
        started = time.perf_counter()
        with DecryptingReader(reader, key, threads=threads) as dec:
            out = NullSink()
            for chunk in dec.iter_chunks():
                out.write(chunk)
        dec_s = time.perf_counter() - started
        assert out.n == size
    os.unlink(path)
    return size / enc_s / 1e6, size / dec_s / 1e6


def main() -> None:
    with tempfile.TemporaryDirectory(
        prefix="hsdk-crypto-bench-", dir=os.environ.get("TMPDIR")
    ) as d:
        for threads in (1, 2):
            enc, dec = run(threads, d)
            print(f"threads={threads}: encrypt {enc:8.0f} MB/s   decrypt {dec:8.0f} MB/s (1 GiB)")


if __name__ == "__main__":
    main()
