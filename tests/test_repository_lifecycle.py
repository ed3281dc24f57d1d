"""The whole backup lifecycle on every kind of target, plain and encrypted: a full and five
incrementals, every point restored equal to a copy of the disk taken at that point; forget by a
daily rule over faked dates (two kept deltas rebased on synthetic fulls), every kept point
restored again; two more backups chain onto what is left; forget keep-last 2 (one more rebase),
every kept point restored again and nothing left on the target but the kept points and their
objects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypersdk.repository.retention import RetentionPolicy
from tests import qemu
from tests.points import make_vm, run_chain

DAY0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
# Six points on four days: keep-daily 3 keeps the newest of days 3, 2 and 1.
DAYS = [0, 0, 1, 2, 2, 3]


@contextmanager
def _repository(kind: str, tmp_path: Path, request, monkeypatch) -> Iterator[str]:
    """A fresh repository URL on ``kind``; credentials come from the environment, as a user's
    would (never in the URL)."""
    if kind == "local":
        yield f"file://{tmp_path / 'repo'}"
    elif kind == "s3":
        from tests.fixtures.moto_server import ACCESS_KEY, SECRET_KEY

        moto = request.getfixturevalue("moto_s3")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        yield (
            f"s3://{moto.new_bucket()}/backups?endpoint_url={moto.endpoint_url}"
            f"&region={moto.region}&addressing_style=path"
        )
    else:
        azurite = request.getfixturevalue("azurite")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
        yield f"az://{azurite.new_container()}/backups"


def _restore_all(target, ids: list[str], copies: Path, tmp_path: Path, key) -> None:
    from hypersdk.repository.restore import points, restore_disk

    assert points(target, "db01") == sorted(ids)
    for export_id in ids:
        fmt = "qcow2" if export_id == ids[-1] else "raw"  # any point into any format
        out = tmp_path / f"r-{export_id}.{fmt}"
        restore_disk(target, "db01", export_id, "disk0", out, fmt, key, cache="unsafe")
        if fmt != "raw":
            qemu.check(out, fmt)
        qemu.compare(copies / f"{export_id}.raw", out, "raw", fmt)
        out.unlink()


def _fake_dates(target, ids: list[str]) -> None:
    """Move the points onto ``DAYS`` by rewriting ``created`` in their manifests."""
    from hypersdk.repository.layout import manifest_key

    for day, export_id in zip(DAYS, ids, strict=True):
        key = manifest_key("db01", export_id)
        doc = json.loads(target.get_bytes(key))
        hour = DAY0 + timedelta(days=day, hours=ids.index(export_id))
        doc["created"] = hour.isoformat()
        target.put_bytes(key, json.dumps(doc).encode())


def _stored_exports(target) -> set[str]:
    """Export ids that own any object on the target (the lock is gone between runs)."""
    keys = [o.key for o in target.list("db01/")]
    assert "db01/lock.json" not in keys
    return {k.split("/")[1] for k in keys}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("kind", ["local", "s3", "azure"])
def test_full_five_deltas_forget_and_restore(
    prefect_api, kind, encrypted, tmp_path, request, monkeypatch, qemu_img
):
    from hypersdk.crypto.keys import KeySpec, generate_key_file
    from hypersdk.repository.chain import point_manifest
    from hypersdk.repository.forget import forget
    from providers import open_target

    root, disk = make_vm(tmp_path)
    copies = tmp_path / "copies"
    copies.mkdir()
    key = None
    if encrypted:
        generate_key_file(tmp_path / "k")
        key = KeySpec(method="keyfile", ref=str(tmp_path / "k"))
    ref = key.model_dump() if key else None
    with _repository(kind, tmp_path, request, monkeypatch) as url:
        results = run_chain(str(root), url, disk, copies, ref, points=6)
        ids = [r.export_id for r in results]
        for r in results[1:]:  # each delta stores only what changed
            assert r.disks[0].object_size < results[0].disks[0].object_size / 4
        with open_target(url) as target:
            _restore_all(target, ids, copies, tmp_path, key)

            _fake_dates(target, ids)
            daily = forget(target, "db01", RetentionPolicy(keep_daily=3), key)
            assert daily.plan.keep_ids == [ids[5], ids[4], ids[2]]
            assert set(daily.chain.rebase) == {ids[4], ids[2]}
            kept = [ids[2], ids[4], ids[5]]
            assert _stored_exports(target) == set(kept)
            _restore_all(target, kept, copies, tmp_path, key)

        more = run_chain(str(root), url, disk, copies, ref, points=2, first=6)
        assert [r.kind for r in more] == ["incremental", "incremental"]
        with open_target(url) as target:
            first_new = point_manifest(target, "db01", more[0].export_id)
            assert first_new.disks[0].parent.export_id == ids[5]
            last2 = forget(target, "db01", RetentionPolicy(keep_last=2), key)
            newest = [r.export_id for r in more]
            assert last2.plan.keep_ids == newest[::-1]
            assert last2.chain.rebase == (newest[0],)  # its parent ids[5] goes
            assert _stored_exports(target) == set(newest)
            _restore_all(target, newest, copies, tmp_path, key)
