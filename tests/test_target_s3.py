"""S3 target against a real moto S3 server on 127.0.0.1: streamed multipart export, ranged
reads, storage class, abort on failure (no orphan parts), clear errors."""

from __future__ import annotations

import time

import pytest

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    InvalidParameterError,
    ObjectNotFoundError,
    TargetError,
)
from providers import open_target
from providers.targets.s3 import MiB, S3Target, choose_part_size
from tests import qemu
from tests.targets_common import SIZE, download, export, make_disk


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return make_disk(tmp_path_factory.mktemp("s3"), seed=6)


def test_scheme_registered(moto_s3):
    t = open_target("s3://bkt/some/prefix", **moto_s3.options())
    assert isinstance(t, S3Target) and t.url == "s3://bkt/some/prefix"


def test_part_size_choice():
    assert choose_part_size(None) == 8 * MiB
    assert choose_part_size(10 * MiB) == 8 * MiB
    big = 200 * 1024**3  # 200 GiB needs > 8 MiB parts to stay under 10,000
    assert choose_part_size(big) * 10_000 >= big
    with pytest.raises(InvalidParameterError):
        choose_part_size(None, 1 * MiB)


def test_streamed_multipart_export_ranged_readback(moto_s3, disk, tmp_path):
    bucket = moto_s3.new_bucket()
    t = S3Target.from_url(
        f"s3://{bucket}/exports", **moto_s3.options(storage_class="STANDARD_IA", part_size=5 * MiB)
    )
    written = export(t, "vm1/disk.raw", disk)
    assert written == SIZE
    head = t.head("vm1/disk.raw")
    assert head["ContentLength"] == SIZE
    assert head["StorageClass"] == "STANDARD_IA"
    assert "-" in head["ETag"]  # a multipart ETag: it really streamed in parts
    assert int(head["ETag"].strip('"').split("-")[1]) == 8
    out = tmp_path / "back.raw"
    download(t, "vm1/disk.raw", out)
    assert out.read_bytes() == disk.read_bytes()
    [info] = list(t.list("vm1/"))
    assert (info.key, info.size, info.storage_class) == ("vm1/disk.raw", SIZE, "STANDARD_IA")
    assert t.pending_uploads() == []
    # the bucket's raw view: the key sits under the prefix
    assert moto_s3.client().head_object(Bucket=bucket, Key="exports/vm1/disk.raw")


def test_qcow2_export_checked_by_qemu_img(moto_s3, disk, tmp_path, qemu_img):
    t = S3Target.from_url(f"s3://{moto_s3.new_bucket()}", **moto_s3.options(checksum="SHA256"))
    export(t, "disk.qcow2", disk, "qcow2")
    out = tmp_path / "back.qcow2"
    download(t, "disk.qcow2", out)
    qemu.check(out, "qcow2")
    head = t.client.head_object(Bucket=t.bucket, Key="disk.qcow2", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")  # parts were uploaded with SHA-256 checksums
    qemu.compare(out, disk, "qcow2", "raw")


def test_small_object_single_put_and_listing(moto_s3):
    t = S3Target.from_url(f"s3://{moto_s3.new_bucket()}/p", **moto_s3.options(sse="AES256"))
    for i in range(5):
        t.put_bytes(f"m/{i}.json", b"x" * i)
    head = t.head("m/3.json")
    assert "-" not in head["ETag"] and head["ServerSideEncryption"] == "AES256"
    assert t.get_bytes("m/3.json") == b"xxx"
    # pagination: list_objects_v2 pages of 2
    t.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: params.update(MaxKeys=2)
    )
    assert [o.key for o in t.list("m/")] == [f"m/{i}.json" for i in range(5)]
    t.delete("m/0.json")
    assert not t.exists("m/0.json") and t.exists("m/1.json")
    with pytest.raises(ObjectNotFoundError):
        t.open_reader("m/0.json")


def test_failure_after_parts_leaves_nothing_then_retry_succeeds(moto_s3, disk):
    t = S3Target.from_url(f"s3://{moto_s3.new_bucket()}/x", **moto_s3.options(part_size=5 * MiB))
    data = disk.read_bytes()
    with pytest.raises(RuntimeError, match="injected"), t.open_writer("disk.raw", SIZE) as w:
        for off in range(0, 4 * 5 * MiB, MiB):
            w.write(data[off : off + MiB])
        raise RuntimeError("injected failure after 4 parts")
    assert list(t.list()) == []
    assert t.pending_uploads() == []
    with pytest.raises(ObjectNotFoundError):
        t.open_reader("disk.raw")
    # the retry starts afresh and publishes cleanly
    with t.open_writer("disk.raw", SIZE) as w:
        w.write(data)
    assert t.get_bytes("disk.raw") == data
    assert t.pending_uploads() == []


def test_invalid_options():
    with pytest.raises(InvalidParameterError, match="storage class"):
        S3Target("b", storage_class="COLDEST")
    with pytest.raises(InvalidParameterError):
        S3Target("b", sse="rot13")
    with pytest.raises(InvalidParameterError):
        S3Target("b", kms_key_id="k")
    with pytest.raises(InvalidParameterError):
        S3Target.from_url("s3:///nobucket")


def test_missing_bucket_clear_error(moto_s3):
    t = S3Target.from_url("s3://nosuch-bucket-hsdk", **moto_s3.options())
    with pytest.raises(
        TargetError, match=r"^s3://nosuch-bucket-hsdk: bucket does not exist \(endpoint http://127"
    ):
        t.put_bytes("k", b"data")
    with pytest.raises(TargetError, match="bucket does not exist"):
        t.open_reader("k")
    with pytest.raises(TargetError, match="bucket does not exist"):
        list(t.list())


def test_bad_credentials_clear_error(moto_s3, moto_iam_auth):
    t = S3Target.from_url("s3://anybucket", **moto_s3.options())
    with pytest.raises(CredentialsError, match="credentials rejected") as exc:
        t.check()
    assert moto_s3.options()["secret_access_key"] not in str(exc.value)
    with pytest.raises(CredentialsError):
        t.put_bytes("k", b"data")


def test_unreachable_endpoint_fails_fast():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = S3Target(
        "b",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="a",
        secret_access_key="b",
        max_attempts=2,
        connect_timeout=1,
    )
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"127.0.0.1:{port}"):
        t.put_bytes("k", b"x")
    assert time.monotonic() - started < 10


def test_parallel_parts_bounded_in_flight(moto_s3, monkeypatch):
    """Parts upload concurrently, but never more than max_inflight are held at once."""
    import threading

    from providers.targets.s3 import S3ObjectWriter

    t = S3Target.from_url(
        f"s3://{moto_s3.new_bucket()}",
        **moto_s3.options(part_size=5 * MiB, workers=3, max_inflight=3),
    )
    lock, running, peak = threading.Lock(), [0], [0]
    real = S3ObjectWriter._upload_part

    def counting(self, number, data):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)
            return real(self, number, data)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(S3ObjectWriter, "_upload_part", counting)
    payload = bytes(range(256)) * (4096 * 5 * 8)  # 8 parts of 5 MiB... as 40 MiB of pattern
    with t.open_writer("p.bin", len(payload)) as w:
        for off in range(0, len(payload), MiB):
            w.write(payload[off : off + MiB])
    assert 2 <= peak[0] <= 3
    assert t.get_bytes("p.bin") == payload


def test_unknown_size_grows_parts(moto_s3):
    t = S3Target.from_url(f"s3://{moto_s3.new_bucket()}", **moto_s3.options())
    w = t.writer("k")  # no expected size: parts double every 1000 so 10,000 parts reach far
    assert [w._next_part_size(n) for n in (1, 1000, 1001, 2001)] == [
        8 * MiB,
        8 * MiB,
        16 * MiB,
        32 * MiB,
    ]
    w.abort()
