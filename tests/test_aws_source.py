"""The AWS source against moto (tests/fixtures/moto_aws.py): inventory, snapshots and which of
them stay, block lists (paged), reads checked against checksums, throttling retried, bad input."""

from __future__ import annotations

import os
import uuid

import pytest

from hypersdk.errors import (
    CredentialsError,
    InvalidParameterError,
    SnapshotError,
    VMNotFoundError,
)
from providers.aws.errors import BlockChecksumError
from tests.fixtures.moto_aws import BLOCK, GiB

pytestmark = pytest.mark.usefixtures("aws_env")


def _block(seed: int) -> bytes:
    return (seed.to_bytes(4, "little") + os.urandom(60)) * (BLOCK // 64)


@pytest.fixture
def instance(moto_aws):
    """A 2-volume instance: a root volume with data in four blocks (written through
    PutSnapshotBlock), a sparse data volume with one block at its very end."""
    root = {0: _block(1), 1: _block(2), 5: _block(3), 1000: _block(4)}
    data = {2047: _block(5)}
    name = f"web-{uuid.uuid4().hex[:8]}"
    inst = moto_aws.make_instance(
        name,
        [
            ("/dev/sda1", moto_aws.snapshot_from_blocks(root), 1),
            ("/dev/sdf", moto_aws.snapshot_from_blocks(data), 1),
        ],
    )
    return name, inst, root, data


def _open(moto_aws, **options):
    from providers import open_source

    return open_source(moto_aws.source_url(**options))


def test_inventory(moto_aws, instance):
    name, inst, _, _ = instance
    with _open(moto_aws) as src:
        vms = {v.name: v for v in src.list_vms()}
        vm = vms[name]
        assert vm.id == inst["InstanceId"] and vm.power_state == "poweredOn"
        assert (vm.cpus, vm.memory_mib, vm.firmware) == (2, 4096, "bios")  # t3.medium
        assert [(d.name, d.capacity, d.controller) for d in vm.disks] == [
            ("sda1", GiB, "/dev/sda1"),
            ("sdf", GiB, "/dev/sdf"),
        ]
        assert vm.annotations["instance_type"] == "t3.medium"
        assert vm.annotations["architecture"] == "x86_64"
        assert vm.nics and vm.nics[0].mac
        assert src.get_vm(inst["InstanceId"]).name == name  # by id too
        with pytest.raises(VMNotFoundError, match="no EC2 instance 'nothere'"):
            src.get_vm("nothere")
        with pytest.raises(VMNotFoundError):
            src.get_vm("i-0123456789abcdef0")


def test_full_then_incremental_reads_and_snapshot_lifecycle(moto_aws, instance, monkeypatch):
    from providers.aws import snapshots

    name, inst, root, data = instance
    iid = inst["InstanceId"]
    with _open(moto_aws, workers=4) as src:
        snap = src.create_snapshot(name)
        assert [sd.disk.name for sd in snap.disks] == ["sda1", "sdf"]
        tags = {t["Key"]: t["Value"] for t in moto_aws.tool_snapshots(iid)[0]["Tags"]}
        assert tags["hypersdk:run"] == snap.id and tags["hypersdk:state"] == "pending"
        disk0, disk1 = (sd.disk for sd in snap.disks)
        full = src.changed_extents(snap, disk0, None)
        assert not full.incremental and full.change_id == snap.disks[0].change_id
        assert [(e.offset // BLOCK, e.length // BLOCK) for e in full.extents] == [
            (0, 2),
            (5, 1),
            (1000, 1),
        ]
        sparse = src.changed_extents(snap, disk1, None)
        assert [(e.offset, e.length) for e in sparse.extents] == [(GiB - BLOCK, BLOCK)]
        reader = src.open_disk(snap, disk0, full.extents)
        try:
            assert reader.read(0, 2 * BLOCK) == root[0] + root[1]
            assert reader.read(5 * BLOCK - 10, 20) == bytes(10) + root[5][:10]
            assert reader.read(1000 * BLOCK + 7, 100) == root[1000][7:107]
        finally:
            reader.close()
        for sd in snap.disks:  # both disks exported and stored: their snapshots stay
            src.change_tracker(snap, sd.disk, full).commit()
        src.remove_snapshot(snap)
        first = {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)}
        assert first == {sd.change_id for sd in snap.disks}

        # the guest writes: block 1 changes, block 7 is new (only in the second snapshot)
        vol = moto_aws.volume_of(inst, "/dev/sda1")
        b1, b7 = _block(11), _block(12)
        moto_aws.guest_write(vol, 1, b1)
        moto_aws.guest_write(vol, 7, b7)
        snap2 = src.create_snapshot(iid)
        d0 = snap2.disks[0].disk
        inc = src.changed_extents(snap2, d0, snap.disks[0].change_id)
        assert inc.incremental and inc.since == snap.disks[0].change_id
        assert [(e.offset // BLOCK, e.length // BLOCK) for e in inc.extents] == [(1, 1), (7, 1)]
        reader = src.open_disk(snap2, d0, inc.extents)
        try:
            assert reader.read(7 * BLOCK, BLOCK) == b7
            assert reader.read(BLOCK, 2 * BLOCK) == b1 + bytes(BLOCK)  # block 2: never written
            assert reader.blocks_fetched == 2  # only the changed blocks moved
        finally:
            reader.close()
        # the run fails (no commit): its snapshots go, the previous point's stay
        src.remove_snapshot(snap2)
        src.remove_snapshot(snap2)  # twice is fine
        assert {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)} == first

        # a deleted base: a full export that says so
        moto_aws.client("ec2").delete_snapshot(SnapshotId=snap.disks[0].change_id)
        snap3 = src.create_snapshot(iid)
        again = src.changed_extents(snap3, snap3.disks[0].disk, snap.disks[0].change_id)
        assert not again.incremental and "no longer exists" in again.note
        bad = src.changed_extents(snap3, snap3.disks[0].disk, "../etc")
        assert not bad.incremental and "not an EBS snapshot id" in bad.note
        other = src.changed_extents(snap3, snap3.disks[0].disk, snap3.disks[1].change_id)
        assert not other.incremental and "is of volume" in other.note  # another disk's
        # a killed run left its snapshots (never removed); once older than STALE_SECONDS...
        killed = src.create_snapshot(iid)
        monkeypatch.setattr(snapshots, "STALE_SECONDS", 0)
        # snap3 committed: the older kept snapshot (not its base: it was a full) and the killed
        # run's are pruned
        for sd in snap3.disks:
            src.change_tracker(snap3, sd.disk, again).commit()
        src.remove_snapshot(snap3)
        assert {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)} == {
            sd.change_id for sd in snap3.disks
        }
        assert not {sd.change_id for sd in killed.disks} & {
            s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)
        }


def test_block_lists_are_paged(moto_aws, monkeypatch):
    from providers.aws import blocks

    monkeypatch.setattr(blocks, "PAGE", 100)  # AWS's smallest MaxResults
    content = {i * 3: bytes([i % 251 + 1]) * BLOCK for i in range(230)}
    name = f"paged-{uuid.uuid4().hex[:8]}"
    inst = moto_aws.make_instance(name, [("/dev/sda1", None, 1)])
    for index, data in content.items():  # the guest fills its disk
        moto_aws.guest_write(moto_aws.volume_of(inst, "/dev/sda1"), index, data)
    moto_aws.fail_next("list_snapshot_blocks", 2)  # throttled pages are asked again
    with _open(moto_aws) as src:
        snap = src.create_snapshot(name)
        try:
            disk = snap.disks[0].disk
            full = src.changed_extents(snap, disk, None)
            assert sorted(e.offset // BLOCK for e in full.extents) == sorted(content)
            assert moto_aws.pending_faults("list_snapshot_blocks") == 0
            reader = src.open_disk(snap, disk, full.extents)
            try:  # tokens are listed a page at a time as the reads move on
                for index in (0, 300, 687, 688):
                    want = content.get(index, bytes(BLOCK))
                    assert reader.read(index * BLOCK, BLOCK) == want, index
            finally:
                reader.close()
        finally:
            src.remove_snapshot(snap)


def test_corrupt_block_is_named_and_throttling_is_retried(moto_aws, instance):
    name, inst, root, _ = instance
    with _open(moto_aws, workers=4) as src:
        snap = src.create_snapshot(name)
        try:
            disk = snap.disks[0].disk
            sid = snap.disks[0].change_id
            full = src.changed_extents(snap, disk, None)
            moto_aws.fail_next("get_snapshot_block", 3)  # ThrottlingException
            moto_aws.fail_next("get_snapshot_block", 1, "ServiceUnavailable", 503)
            with src.open_disk(snap, disk, full.extents) as reader:
                assert reader.read(0, BLOCK) == root[0]
                assert reader.read(5 * BLOCK, BLOCK) == root[5]
            assert moto_aws.pending_faults("get_snapshot_block") == 0
            moto_aws.corrupt(sid, 5)
            with (
                src.open_disk(snap, disk, full.extents) as reader,
                pytest.raises(BlockChecksumError, match=f"{sid}, block 5 .*checksum"),
            ):
                reader.read(4 * BLOCK, 2 * BLOCK)
            assert not BlockChecksumError.retryable
        finally:
            src.remove_snapshot(snap)
        assert moto_aws.tool_snapshots(inst["InstanceId"]) == []


def test_throttling_past_every_retry_is_a_retryable_error(moto_aws, instance):
    from providers.aws.errors import ThrottledError

    name, inst, _, _ = instance
    with _open(moto_aws, attempts=2, workers=1) as src:  # one block in flight: both faults hit it
        snap = src.create_snapshot(name)
        try:
            full = src.changed_extents(snap, snap.disks[0].disk, None)
            moto_aws.fail_next("get_snapshot_block", 2)
            with (
                src.open_disk(snap, snap.disks[0].disk, full.extents) as reader,
                pytest.raises(ThrottledError, match="ThrottlingException"),
            ):
                reader.read(0, BLOCK)
            assert ThrottledError.retryable
        finally:
            moto_aws.clear_faults()
            src.remove_snapshot(snap)


def test_failed_snapshot_creation_leaves_nothing(moto_aws, instance):
    name, inst, _, _ = instance
    moto_aws.fail_next("describe_snapshots", 30, "InvalidSnapshot.Broken", 400)
    with _open(moto_aws, attempts=2) as src, pytest.raises(SnapshotError):
        src.create_snapshot(name)
    moto_aws.clear_faults()
    assert moto_aws.tool_snapshots(inst["InstanceId"]) == []


def test_bad_input(moto_aws, monkeypatch, tmp_path):
    from providers import open_source

    with pytest.raises(InvalidParameterError, match="unknown AWS region 'mars-north-9'"):
        open_source(f"aws://mars-north-9?endpoint_url={moto_aws.endpoint_url}")
    with pytest.raises(InvalidParameterError, match="has no option"):
        open_source(f"aws://us-east-1?color=red&endpoint_url={moto_aws.endpoint_url}")
    with pytest.raises(InvalidParameterError, match="secret"):
        open_source("aws://us-east-1?aws_secret_access_key=abc")
    with pytest.raises(InvalidParameterError, match="region only"):
        open_source("aws://us-east-1/i-0123")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with _open(moto_aws) as src, pytest.raises(CredentialsError, match="no AWS credentials"):
        src.list_vms()
