"""Cloud target upload benchmark against the local emulators (moto S3, Azurite, fake-gcs-server).

For each target: a raw export of a realistic image (default 512 MiB) streamed through
``convert_stream`` into ``target.open_writer`` (multipart / staged blocks / resumable chunks),
next to the emulator's own speed for a single SDK PUT of the same bytes, measured in the same
run. Emulators are the bottleneck here, so the ratio (export / single PUT) is the number that
tells whether the streaming writer adds overhead.

    python -m benchmarks.targets [--size-mib 512] [--dir /var/tmp/hsbench] [--only s3,az,gs,gs64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from benchmarks._util import realistic_image

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@contextlib.contextmanager
def moto_process():
    """moto_server in its own process (not a thread of ours: it would share our GIL)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


PEAK_RSS: dict[str, float] = {}


def export(target, key: str, image_path: Path) -> tuple[float, int]:
    """Time one streamed export; record how much this process's RSS grew meanwhile (MiB)."""
    import threading

    from hypersdk.convert import convert_stream, scan_data_extents
    from hypersdk.formats import open_image

    with open_image(image_path, "raw") as image:
        extents = scan_data_extents(image, image.extents())
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], _rss() - base)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        with target.open_writer(key, image.size) as w:
            convert_stream(image, "raw", w, extents)
            n = w.tell()
        secs = time.perf_counter() - started
        done.set()
        sampler.join()
        PEAK_RSS[target.url] = peak[0] / MiB
        return secs, n


def bench_s3(image: Path) -> tuple[float, float]:
    import boto3
    from botocore.config import Config

    from providers.targets.s3 import S3Target

    with moto_process() as endpoint:
        creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, read_timeout=300),
            **creds,
        )
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        t = S3Target(
            bucket,
            endpoint_url=endpoint,
            access_key_id="bench",
            secret_access_key="bench",
            addressing_style="path",
            read_timeout=300,
        )
        secs, n = export(t, "export.raw", image)
        t.delete("export.raw")
        data = image.read_bytes()  # loaded after the export, so its RSS is not counted
        started = time.perf_counter()
        client.put_object(Bucket=bucket, Key="single.raw", Body=data)
        single = time.perf_counter() - started
        return n / secs / MiB, len(data) / single / MiB


def bench_azure(image: Path) -> tuple[float, float]:
    from providers.targets.azure_blob import AzureBlobTarget
    from tests.fixtures.azurite import ACCOUNT, KEY, start_azurite

    server = start_azurite()
    try:
        svc = server.service()
        container = f"bench-{uuid.uuid4().hex[:8]}"
        svc.create_container(container)
        t = AzureBlobTarget(
            container,
            account=ACCOUNT,
            account_url=server.account_url,
            account_key=KEY,
            read_timeout=300,
        )
        secs, n = export(t, "export.raw", image)
        t.delete("export.raw")
        data = image.read_bytes()  # loaded after the export, so its RSS is not counted
        blob = svc.get_blob_client(container, "single.raw")
        started = time.perf_counter()
        # one Put Blob request (the SDK would otherwise split it into blocks itself)
        blob._config.max_single_put_size = len(data) + 1
        blob.upload_blob(data, overwrite=True, timeout=600)
        single = time.perf_counter() - started
        return n / secs / MiB, len(data) / single / MiB
    finally:
        server.stop()


def bench_gcs(image: Path, chunk_mib: int = 16) -> tuple[float, float]:
    from providers.targets.gcs import GCSTarget
    from tests.fixtures.fake_gcs import start_fake_gcs

    server = start_fake_gcs()
    try:
        client = server.client()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(bucket)
        t = GCSTarget(
            bucket,
            endpoint=server.endpoint,
            anonymous=True,
            read_timeout=300,
            chunk_size=chunk_mib * MiB,
        )
        secs, n = export(t, "export.raw", image)
        t.delete("export.raw")
        data = image.read_bytes()  # loaded after the export, so its RSS is not counted
        blob = client.bucket(bucket).blob("single.raw")
        started = time.perf_counter()
        blob.upload_from_string(data, timeout=600)  # one multipart (metadata + media) request
        single = time.perf_counter() - started
        return n / secs / MiB, len(data) / single / MiB
    finally:
        server.stop()


BENCHES = {"s3": ("S3 (moto)", bench_s3), "az": ("Azure (Azurite)", bench_azure)}
BENCHES["gs"] = ("GCS (fake-gcs), 16 MiB", bench_gcs)
BENCHES["gs64"] = ("GCS (fake-gcs), 64 MiB", lambda image: bench_gcs(image, 64))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--dir", default=None, help="where the image is made (default: a temp dir)")
    ap.add_argument("--only", default="s3,az,gs,gs64")
    args = ap.parse_args(argv)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hsbench-targets-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        image = realistic_image(tmp, args.size_mib * MiB, name="targets-bench.raw")
        rows = []
        for name in args.only.split(","):
            label, fn = BENCHES[name.strip()]
            print(f"{label}: running...", file=sys.stderr, flush=True)
            PEAK_RSS.clear()
            export_mbs, single_mbs = fn(image)
            rows.append((label, export_mbs, single_mbs, max(PEAK_RSS.values())))
        print(f"\n{args.size_mib} MiB raw export (realistic image), {os.cpu_count()} CPUs")
        print(
            f"{'target':<24} {'export MiB/s':>13} {'single PUT MiB/s':>17} {'ratio':>7}"
            f" {'export +RSS MiB':>16}"
        )
        for label, e, s, rss in rows:
            print(f"{label:<24} {e:>13.1f} {s:>17.1f} {e / s:>7.2f} {rss:>16.0f}")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
