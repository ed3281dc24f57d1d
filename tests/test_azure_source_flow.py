"""migrate_vm with an azure:// source, end to end on the fake cloud (ARM REST fake + Azurite
behind the page-diff proxy): a VM with two disks exported full and then incrementally, each
point restored and compared with qemu-img; a failing run; access always revoked; no SAS in
the manifests, the objects, the run's logs or its artifact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypersdk.errors import HyperSDKError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from tests import qemu
from tests.points import assert_point_equals

MiB = 1024 * 1024
BS = 64 * 1024


def _run_texts(flow_run_id: str) -> str:
    """The run's log messages and artifacts, as one text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async def read() -> str:
        async with get_client() as client:
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
        return "\n".join([e.message for e in logs] + [str(a.data) for a in arts])

    return asyncio.run(read())


def test_migrate_two_disks_full_incremental_and_failure(prefect_api, azure_rg, tmp_path, qemu_img):
    from flows.migrate import migrate_vm

    vm = "app01"
    sizes = {"app01-os": 8 * MiB, "app01-data": 5 * MiB}
    azure_rg.add_vm(vm, sizes)
    files = {}
    for i, (disk, size) in enumerate(sizes.items()):
        path = tmp_path / f"{disk}.raw"
        write_realistic_disk(path, size, seed=40 + i)
        azure_rg.write_file(disk, path)
        files["os" if i == 0 else "lun0"] = (disk, path)
    source = azure_rg.cloud.source_url(azure_rg.sub, azure_rg.name, poll_interval=0.05)
    target = tmp_path / "exports"

    r1 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    assert r1.kind == "full" and r1.verified and [d.name for d in r1.disks] == ["os", "lun0"]
    for d in r1.disks:
        qemu.compare(files[d.name][1], target / d.key, "raw", "qcow2")
    assert azure_rg.active_grants() == []
    assert len(azure_rg.snapshots()) == 2  # kept: the next incremental's bases

    os_disk, os_file = files["os"]
    changed = mutate_disk(os_file, 7, seed=5)
    azure_rg.write_file(os_disk, os_file, offsets=changed)
    r2 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    assert r2.kind == "incremental"
    d_os, d_data = r2.disks
    assert d_os.incremental and d_os.base_key == r1.disks[0].key
    assert d_os.data_bytes == len(changed) * BS  # only the changed blocks moved and stored
    assert d_os.stages["download"]["bytes"] == d_os.data_bytes
    assert d_data.incremental and d_data.data_bytes == 0  # nothing written there
    for name in ("os", "lun0"):
        assert_point_equals(
            f"file://{target}", vm, r2.export_id, files[name][1], tmp_path, disk=name
        )
    assert azure_rg.active_grants() == []
    # per disk: the base this run diffed against and its own (the next run prunes the base)
    assert len(azure_rg.snapshots()) == 4

    blocked = tmp_path / "exports2"
    blocked.mkdir()
    (blocked / vm).write_text("a file where the VM's export directory should be")
    with pytest.raises(HyperSDKError):  # past the pre-run checks: fails while uploading
        migrate_vm(source=source, target=f"file://{blocked}", vm=vm, incremental=False)
    assert azure_rg.active_grants() == []  # revoked after the failure too

    sigs = azure_rg.cloud.proxy.issued
    assert sigs
    texts = [p.read_bytes() for p in Path(target).rglob("*") if p.is_file()]
    texts += [_run_texts(r.flow_run_id).encode() for r in (r1, r2)]
    for blob in texts:
        assert b"sig=" not in blob
        for sig in sigs:
            assert sig.encode() not in blob
