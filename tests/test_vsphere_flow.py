"""migrate_vm with a vsphere:// source: full, then incremental from CBT, then a failing run, all
against vcsim; credentials from the environment as govc documents them."""

from __future__ import annotations

import time

import pytest

from hypersdk.errors import HyperSDKError
from hypersdk.imagegen import mutate_disk, write_realistic_disk
from tests import qemu
from tests.fixtures.vcsim import reconfigure, snapshot_names
from tests.points import assert_point_equals

MiB = 1024 * 1024
BS = 64 * 1024


@pytest.fixture
def govc_env(vcsim, monkeypatch):
    monkeypatch.setenv("GOVC_URL", f"https://{vcsim.host}:{vcsim.port}/sdk")
    monkeypatch.setenv("GOVC_USERNAME", vcsim.user)
    monkeypatch.setenv("GOVC_PASSWORD", vcsim.password)
    monkeypatch.setenv("GOVC_INSECURE", "1")


def test_migrate_vm_full_incremental_and_failure(prefect_api, vcsim, govc_env, tmp_path, qemu_img):
    from flows.migrate import migrate_vm
    from providers import open_source

    vm = "DC0_H0_VM0"
    size = 12 * MiB + 64 * 1024
    reconfigure(vcsim, vm, disk_size=size)
    flat = vcsim.flat_file(vm)
    write_realistic_disk(flat, size, seed=21)
    source = vcsim.source_url(f"DC0/vm/{vm}")
    with open_source(source) as src:
        src.enable_cbt(vm)
    target = tmp_path / "exports"

    r1 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    assert r1.kind == "full" and r1.verified and r1.vm == vm
    out1 = target / r1.disks[0].key
    qemu.compare(flat, out1, "raw", "qcow2")
    assert snapshot_names(vcsim, vm) == []

    changed = mutate_disk(flat, 5, seed=2)
    r2 = migrate_vm(source=source, target=f"file://{target}", vm=vm, format="qcow2")
    d2 = r2.disks[0]
    assert r2.kind == "incremental" and d2.incremental and d2.base_key == r1.disks[0].key
    assert d2.data_bytes == len(changed) * BS  # CBT: only the changed blocks moved
    assert d2.stages["download"]["bytes"] == d2.data_bytes
    assert_point_equals(f"file://{target}", vm, r2.export_id, flat, tmp_path)  # base + delta
    assert snapshot_names(vcsim, vm) == []

    blocked = tmp_path / "exports2"
    blocked.mkdir()
    (blocked / vm).write_text("a file where the VM's export directory should be")
    with pytest.raises(HyperSDKError):  # past the pre-run checks: fails while uploading
        migrate_vm(
            source=source, target=f"file://{blocked}", vm=vm, format="qcow2", incremental=False
        )
    assert snapshot_names(vcsim, vm) == []  # removed after the failure too


def test_provider_warning_reaches_the_run_logs(prefect_api, vcsim, govc_env, tmp_path):
    """A change id vSphere rejects (CBT reset) gives a full export, and the provider's warning
    about it is in the run's logs in Prefect, not only on some terminal."""
    import asyncio
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.migrate import migrate_vm
    from providers import open_source

    vm = "DC0_H0_VM1"
    reconfigure(vcsim, vm, disk_size=4 * MiB)
    write_realistic_disk(vcsim.flat_file(vm), 4 * MiB, seed=9)
    source = vcsim.source_url(f"DC0/vm/{vm}")
    with open_source(source) as src:
        src.enable_cbt(vm)
    target = tmp_path / "exports"
    r1 = migrate_vm(source=source, target=f"file://{target}", vm=vm)
    manifest = target / vm / r1.export_id / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["disks"][0]["change_id"] = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/9"
    manifest.write_text(json.dumps(doc))  # as if CBT had been reset since

    r2 = migrate_vm(source=source, target=f"file://{target}", vm=vm)
    assert r2.kind == "full" and "rejected by vSphere" in r2.disks[0].note

    async def logs():
        async with get_client() as client:
            run_filter = LogFilterFlowRunId(any_=[r2.flow_run_id])
            return await client.read_logs(LogFilter(flow_run_id=run_filter))

    def provider_warnings() -> list:
        return [
            e
            for e in asyncio.run(logs())
            if e.level >= 30 and e.name.startswith("providers") and "rejected by" in e.message
        ]

    deadline = time.monotonic() + 30  # logs travel in batches
    while not provider_warnings() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert provider_warnings()


def test_credentials_from_prefect_secret_block(prefect_api, vcsim, monkeypatch):
    from prefect.blocks.system import Secret

    from providers import open_source
    from providers.vsphere import connection

    for var in ("GOVC_URL", "GOVC_USERNAME", "GOVC_PASSWORD", "GOVC_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    Secret(value={"username": vcsim.user, "password": vcsim.password}).save(
        "vcsim-login", overwrite=True
    )
    connection.logout_all()
    with open_source(vcsim.source_url(), secret="vcsim-login", insecure=True) as src:
        assert len(src.list_vms()) == 4
        assert vcsim.password not in repr(src.creds) and vcsim.password not in src.url
        assert "SecretStr('**********')" in repr(src.creds)
    Secret(value=json_login(vcsim.user, "wrong")).save("vcsim-bad", overwrite=True)
    with pytest.raises(HyperSDKError, match="wrong user name or password"):
        open_source(vcsim.source_url(), secret="vcsim-bad", insecure=True).list_vms()
    with pytest.raises(HyperSDKError, match="Secret block 'missing-block'"):
        open_source(vcsim.source_url(), secret="missing-block", insecure=True)


def json_login(user: str, password: str) -> str:
    import json

    return json.dumps({"username": user, "password": password})
