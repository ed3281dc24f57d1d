"""GCS target against a real fake-gcs-server on 127.0.0.1: streamed resumable export, ranged
reads, storage class, nothing visible after a failure, clear errors."""

from __future__ import annotations

import json
import socket
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
from providers.targets.gcs import GCSResumableWriter, GCSTarget, MiB
from tests.targets_common import SIZE, export, make_disk, read_back


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return make_disk(tmp_path_factory.mktemp("gcs"), seed=8)


def test_schemes_registered(fake_gcs):
    for scheme in ("gs", "gcs"):
        t = open_target(f"{scheme}://bkt/pre", **fake_gcs.options())
        assert isinstance(t, GCSTarget) and t.url == "gs://bkt/pre"


def test_resumable_export_ranged_readback(fake_gcs, disk, monkeypatch):
    bucket = fake_gcs.new_bucket()
    t = GCSTarget.from_url(f"gs://{bucket}/exports", **fake_gcs.options(chunk_size=4 * MiB))
    chunks = []
    real = GCSResumableWriter._upload_part
    monkeypatch.setattr(
        GCSResumableWriter,
        "_upload_part",
        lambda self, n, data: chunks.append(len(data)) or real(self, n, data),
    )
    assert export(t, "vm1/disk.raw", disk) == SIZE
    assert chunks == [4 * MiB] * 10  # it streamed, chunk by chunk, through one session
    assert t.blob_info("vm1/disk.raw").size == SIZE
    assert read_back(t, "vm1/disk.raw") == disk.read_bytes()
    [info] = list(t.list("vm1/"))
    assert (info.key, info.size) == ("vm1/disk.raw", SIZE)
    assert fake_gcs.client().bucket(bucket).get_blob("exports/vm1/disk.raw").size == SIZE


def test_storage_class_small_object_listing_delete(fake_gcs):
    t = GCSTarget.from_url(
        f"gs://{fake_gcs.new_bucket()}", **fake_gcs.options(storage_class="coldline")
    )
    for i in range(4):
        t.put_bytes(f"m/{i}.json", b"z" * (i + 1))
    # fake-gcs-server keeps storageClass on single-request uploads (it ignores it on resumable
    # sessions, see docs/targets.md)
    assert t.blob_info("m/1.json").storage_class == "COLDLINE"
    assert t.get_bytes("m/2.json") == b"zzz"
    assert [o.key for o in t.list("m/")] == [f"m/{i}.json" for i in range(4)]
    t.delete("m/0.json")
    t.delete("m/0.json")
    assert not t.exists("m/0.json")
    with pytest.raises(ObjectNotFoundError):
        t.open_reader("m/0.json")


def test_failure_after_chunks_leaves_nothing_then_retry(fake_gcs, disk):
    bucket = fake_gcs.new_bucket()
    t = GCSTarget.from_url(f"gs://{bucket}/x", **fake_gcs.options(chunk_size=4 * MiB))
    data = disk.read_bytes()
    with pytest.raises(RuntimeError, match="injected"), t.open_writer("disk.raw", SIZE) as w:
        for off in range(0, 5 * 4 * MiB, MiB):
            w.write(data[off : off + MiB])
        raise RuntimeError("injected failure after 5 chunks")
    assert fake_gcs.client().bucket(bucket).get_blob("x/disk.raw") is None
    assert list(t.list()) == []
    with t.open_writer("disk.raw", SIZE) as w:
        w.write(data)
    assert t.get_bytes("disk.raw") == data


def test_invalid_options(fake_gcs):
    with pytest.raises(InvalidParameterError, match="storage class"):
        GCSTarget("b", storage_class="FROZEN", **fake_gcs.options())
    with pytest.raises(InvalidParameterError, match="256 KiB"):
        GCSTarget("b", chunk_size=1000, **fake_gcs.options())
    with pytest.raises(InvalidParameterError):
        GCSTarget.from_url("gs:///nobucket")


def test_bad_service_account_clear_error(tmp_path):
    bad = tmp_path / "sa.json"
    bad.write_text(json.dumps({"type": "service_account", "client_email": "x@y"}))
    with pytest.raises(CredentialsError, match="sa.json"):
        GCSTarget("b", endpoint="https://storage.googleapis.com", credentials_file=str(bad))
    with pytest.raises(CredentialsError, match="credentials_json"):
        GCSTarget("b", credentials_json="{not json")


def test_missing_bucket_clear_error(fake_gcs):
    t = GCSTarget.from_url("gs://nosuch-bucket-hsdk", **fake_gcs.options())
    with pytest.raises(TargetError, match=r"^gs://nosuch-bucket-hsdk: bucket does not exist"):
        t.put_bytes("k", b"data")
    with pytest.raises(TargetError, match="bucket does not exist"), t.open_writer("big") as w:
        w.write(bytes(20 * MiB))
    with pytest.raises(TargetError, match="bucket does not exist"):
        t.open_reader("k")


def test_unreachable_endpoint_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = GCSTarget("b", endpoint=f"http://127.0.0.1:{port}", anonymous=True, retry_seconds=2)
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"127.0.0.1:{port}"):
        t.put_bytes("k", b"x")
    with pytest.raises(EndpointUnreachableError), t.open_writer("big") as w:
        w.write(bytes(20 * MiB))
    assert time.monotonic() - started < 15
