"""Backups of an EC2 instance through the whole pipeline, against moto (tests/fixtures/
moto_aws.py): a full of two volumes (one sparse), an incremental that moves only the blocks the
guest changed, both restored identical; a corrupted block and an interrupted run fail and leave
no snapshot of theirs; throttling is retried. And hyperctl: `vms list`, `info` and `convert` of
an ebs:// snapshot, bad input as one line."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from hypersdk.errors import HyperSDKError
from tests import qemu
from tests.cli_run import hyperctl, one_line_error
from tests.fixtures.moto_aws import BLOCK, GiB
from tests.points import assert_point_equals

pytestmark = pytest.mark.usefixtures("aws_env")


def _block() -> bytes:
    return os.urandom(64) * (BLOCK // 64)


@pytest.fixture
def staged(moto_aws):
    """A 2-volume instance: the root volume's content written through PutSnapshotBlock, the
    data volume sparse (one block, at its end)."""
    root = {i: _block() for i in (0, 1, 2, 9, 300)}
    name = f"db-{uuid.uuid4().hex[:8]}"
    inst = moto_aws.make_instance(
        name,
        [
            ("/dev/sda1", moto_aws.snapshot_from_blocks(root), 1),
            ("/dev/sdf", moto_aws.snapshot_from_blocks({2047: _block()}), 1),
        ],
    )
    vols = {
        "sda1": moto_aws.volume_of(inst, "/dev/sda1"),
        "sdf": moto_aws.volume_of(inst, "/dev/sdf"),
    }
    return name, inst["InstanceId"], vols


def _assert_restores(moto_aws, target, name, result, vols, tmp_path):
    for disk, vol in vols.items():
        expected = tmp_path / f"{result.export_id}-{disk}.raw"
        moto_aws.volume_image(vol, expected, GiB)
        assert_point_equals(target, name, result.export_id, expected, tmp_path, disk=disk)


def _change_ids(result_manifest: Path) -> set[str]:
    doc = json.loads(result_manifest.read_text())
    return {d["change_id"] for d in doc["disks"]}


def test_backup_full_incremental_failures(prefect_api, moto_aws, staged, tmp_path, qemu_img):
    from flows.backup import backup_vm

    name, iid, vols = staged
    source = moto_aws.source_url(workers=4)
    repo = tmp_path / "repo"
    target = f"file://{repo}"

    r1 = backup_vm(vm=name, source=source, target=target)
    assert r1.kind == "full" and [d.name for d in r1.disks] == ["sda1", "sdf"]
    assert [d.data_bytes for d in r1.disks] == [5 * BLOCK, BLOCK]  # sparse: only what is there
    _assert_restores(moto_aws, target, name, r1, vols, tmp_path)
    ids1 = _change_ids(repo / name / r1.export_id / "manifest.json")
    assert {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)} == ids1  # the next base

    # the guest changes two blocks and writes a new one; AWS throttles a few calls
    moto_aws.guest_write(vols["sda1"], 1, _block())
    moto_aws.guest_write(vols["sda1"], 300, _block())
    moto_aws.guest_write(vols["sda1"], 77, _block())
    moto_aws.fail_next("get_snapshot_block", 3)
    moto_aws.fail_next("get_snapshot_block", 1, "ServiceUnavailable", 503)
    moto_aws.fail_next("create_snapshots", 1, "RequestLimitExceeded", 503)
    r2 = backup_vm(vm=name, source=source, target=target)
    assert moto_aws.pending_faults("get_snapshot_block") == 0
    assert moto_aws.pending_faults("create_snapshots") == 0
    root, data = r2.disks
    assert r2.kind == "incremental" and root.incremental and data.incremental
    assert root.data_bytes == 3 * BLOCK and data.data_bytes == 0  # only what changed moved
    assert root.stages["download"]["bytes"] == 3 * BLOCK
    _assert_restores(moto_aws, target, name, r2, vols, tmp_path)  # base + delta, identical
    ids2 = _change_ids(repo / name / r2.export_id / "manifest.json")
    kept = {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)}
    assert kept == ids2 | ids1  # the new point's snapshots, and the bases they were deltas on

    # a block of the next snapshot comes back damaged: the run fails naming it, and its
    # snapshots are gone (the kept ones stay)
    moto_aws.guest_write(vols["sda1"], 2, _block())
    moto_aws.corrupt_next_snapshot(vols["sda1"], 2)
    with pytest.raises(HyperSDKError, match=r"snap-[0-9a-f]+, block 2 .*checksum mismatch"):
        backup_vm(vm=name, source=source, target=target)
    assert {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)} == kept

    # interrupted while storing (the target refuses): nothing of the run stays either
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / name).write_text("a file where the VM's directory should be")
    with pytest.raises(HyperSDKError):
        backup_vm(vm=name, source=source, target=f"file://{blocked}")
    assert {s["SnapshotId"] for s in moto_aws.tool_snapshots(iid)} == kept


def test_cli_list_info_convert_and_bad_input(moto_aws, staged, tmp_path, qemu_img):
    name, iid, vols = staged
    res = hyperctl("vms", "list", "--source", moto_aws.source_url(), "--json")
    assert res.returncode == 0, res.stderr
    vm = next(v for v in json.loads(res.stdout) if v["name"] == name)
    assert vm["id"] == iid and [d["capacity"] for d in vm["disks"]] == [GiB, GiB]
    assert vm["machine_type"] == vm["annotations"]["instance_type"] == "t3.medium"
    table = hyperctl("vms", "list", "--source", moto_aws.source_url())
    row = next(line for line in table.stdout.splitlines() if name in line)
    assert "t3.medium" in row and "1.0 GiB" in row, table.stdout  # state, type, volumes, sizes

    snap = moto_aws.client("ec2").create_snapshot(VolumeId=vols["sda1"])["SnapshotId"]
    url = moto_aws.ebs_url(snap)
    res = hyperctl("info", url, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["format"], info["virtual_size"], info["allocated_bytes"]) == (
        "raw",
        GiB,
        5 * BLOCK,
    )
    out = tmp_path / "snap.qcow2"
    res = hyperctl("convert", url, out, "-O", "qcow2", "-q")
    assert res.returncode == 0, res.stderr
    expected = tmp_path / "expected.raw"
    moto_aws.volume_image(vols["sda1"], expected, GiB)
    qemu.compare(expected, out, "raw", "qcow2")

    one_line_error(
        hyperctl(
            "migrate",
            "no-such-vm",
            "--source",
            moto_aws.source_url(),
            "--target",
            f"file://{tmp_path}/t",
        ),
        "no EC2 instance 'no-such-vm'",
    )
    one_line_error(
        hyperctl(
            "vms", "list", "--source", f"aws://mars-north-9?endpoint_url={moto_aws.endpoint_url}"
        ),
        "unknown AWS region 'mars-north-9'",
    )
    one_line_error(hyperctl("info", moto_aws.ebs_url("snap-0123456789abcdef0")), "not found")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    one_line_error(
        hyperctl("vms", "list", "--source", moto_aws.source_url(), env=env), "no AWS credentials"
    )
